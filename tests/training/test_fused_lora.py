"""The fused LoRA forward: PEFT's sum in one addmm, with PEFT's parameters and PEFT's forward for anything else."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from elmtune.training.fused_lora import FusedLoraLinear, use_fused_lora
from tests.helpers import tiny_model

TARGETS = ["token_embeddings", "qkv_proj", "out_proj", "proj_1", "proj_2"]


def lora_model(fused: bool, **extra):
    torch.manual_seed(1)
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                    **extra))
    with torch.no_grad():  # B starts at zero: give the adapters a real effect
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    if fused:
        assert use_fused_lora(model) == 2 * 4  # every adapted Linear of the 2 layers; the embedding stays PEFT's
    return model.train()


def loss_and_grads(model, dtype=None):
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_loss_and_gradients_as_peft():
    loss, grads = loss_and_grads(lora_model(fused=False))
    fused_loss, fused_grads = loss_and_grads(lora_model(fused=True))
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_matches_peft_within_bf16_rounding():
    """Under bf16 autocast the two differ only in rounding (the fused sum is rounded once, PEFT's three times):
    loss within 3e-3 (a 10% error in the LoRA scale moves it by 1e-2) and every gradient within 10% in norm
    (that error moves some by 40%)."""
    peft_loss, peft_grads = loss_and_grads(lora_model(fused=False), torch.bfloat16)
    fused_loss, fused_grads = loss_and_grads(lora_model(fused=True), torch.bfloat16)
    assert abs(fused_loss - peft_loss) <= 3e-3
    for name, grad in peft_grads.items():
        assert (fused_grads[name] - grad).norm() <= 0.1 * grad.norm(), name


@pytest.mark.parametrize("case", ["merged", "disabled", "two adapters"])
def test_other_cases_run_peft_forward(case):
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    peft_model, fused_model = lora_model(fused=False), lora_model(fused=True)
    for model in (peft_model, fused_model):
        layer = model.get_base_model().transformer.layers[0].ffn.proj_1
        if case == "merged":
            layer.merge()
        elif case == "disabled":
            layer.enable_adapters(False)
        else:
            torch.manual_seed(5)  # the same random second adapter in both models
            layer.update_layer("second", 4, 8, config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
            layer.set_adapter(["default", "second"])
    peft_layer = peft_model.get_base_model().transformer.layers[0].ffn.proj_1
    fused_layer = fused_model.get_base_model().transformer.layers[0].ffn.proj_1
    assert type(fused_layer) is FusedLoraLinear and type(peft_layer) is LoraLinear
    torch.testing.assert_close(fused_layer(x), peft_layer(x))


def test_state_dict_is_peft_s():
    assert lora_model(fused=True).state_dict().keys() == lora_model(fused=False).state_dict().keys()
