"""The cheaper CPU LoRA dropout: the same distribution as nn.Dropout, reproducible, swapped into PEFT models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from elmtune.training.dropout import LEVELS, FastDropout, use_fast_dropout
from tests.helpers import tiny_model


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keeps_each_element_with_probability_1_minus_p_and_is_unbiased(p):
    torch.manual_seed(0)
    x = torch.full((512, 1024), 2.0)
    out = FastDropout(p).train()(x)
    kept = out != 0
    rounded = round(p * LEVELS) / LEVELS
    n = x.numel()
    sigma = (rounded * (1 - rounded) / n) ** 0.5
    assert abs((~kept).float().mean().item() - rounded) < 5 * sigma
    assert torch.allclose(out[kept], torch.tensor(2.0 / (1 - rounded)))  # survivors scaled by 1 / (1 - p)
    assert abs(out.mean().item() - 2.0) < 2.0 * 5 * sigma / (1 - rounded)  # expectation = input
    # independence: neighbouring elements (the four lanes of one 64-bit draw) are dropped independently
    pairs = (~kept).view(-1, 4).float()
    assert abs((pairs[:, 0] * pairs[:, 3]).mean().item() - rounded**2) < 5 * (rounded**2 / (n / 4)) ** 0.5


def test_gradient_is_the_mask_times_the_scale_and_eval_is_identity():
    torch.manual_seed(1)
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    dropout = FastDropout(0.25).train()
    out = dropout(x)
    out.backward(torch.ones_like(out))
    scale = LEVELS / (LEVELS - round(0.25 * LEVELS))
    assert torch.equal(x.grad, (out != 0).to(x.dtype) * scale)
    assert torch.equal(dropout.eval()(x), x)


def test_reproducible_from_the_torch_seed():
    x = torch.randn(100, 100)
    torch.manual_seed(3)
    a = FastDropout(0.1).train()(x)
    torch.manual_seed(3)
    b = FastDropout(0.1).train()(x)
    assert torch.equal(a, b)


def test_every_lora_dropout_of_a_peft_model_is_swapped():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                    target_modules=["qkv_proj", "out_proj", "proj_1", "proj_2"]))
    layers = model.base_model.model.config.num_transformer_layers
    assert use_fast_dropout(model) == 4 * layers
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is FastDropout and m.p == 0.1 for m in dropouts)
