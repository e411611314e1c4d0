"""Packed attention on a CUDA GPU: the paths that cannot run on the CPU (skipped there, with the reason).

* SDPA in bf16 takes one ``varlen_attn`` call per layer; a packed row must be as close to the fp32 per-document
  truth as the same examples run one at a time in bf16 are (a document seeing another is off by whole units);
* SDPA in fp32 takes one masked call per layer, which must match the examples alone tightly;
* flash_attention_2 (when flash_attn is installed) and flex_attention keep documents apart just as well.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import elmtune.models.openelm as openelm
from elmtune.data.collate import PackedCollator
from tests.helpers import tiny_model

LENGTHS = [37, 1, 120, 64, 9, 250]  # one packed row of 481 tokens, with a one-token document


def examples(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random documents of LENGTHS: the first third of each is an unsupervised prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        out.append((ids, [-100] * (n // 3 + 1) + ids[n // 3 + 1:]))
    return out


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[1:]
    losses = F.cross_entropy(logits[:-1].float(), targets.clamp(min=0), reduction="none")
    return losses[targets != -100]


def losses_and_grads(model, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 per-token losses of the examples (one packed row, or each alone), and the gradient of their sum over
    every parameter, flattened into one fp32 vector."""
    model.zero_grad(set_to_none=True)
    data = examples()
    if packed:
        batch = {k: v.cuda() for k, v in PackedCollator()([{"input_ids": i, "labels": l} for i, l in data]).items()}
        logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        losses = per_token_losses(logits, batch["labels"][0])
    else:
        losses = torch.cat([per_token_losses(model(torch.tensor([i], device="cuda")).logits[0],
                                             torch.tensor(l, device="cuda")) for i, l in data])
    losses.sum().backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    return losses.detach().float(), grads


def bf16_and_fp32_models(implementation: str):
    """The same weights (rounded to bf16) computing in bf16 and in fp32, on the GPU."""
    model = tiny_model().to("cuda", torch.bfloat16)
    model.config._attn_implementation = implementation  # the setter: no availability check
    reference = copy.deepcopy(model).float()
    reference.config._attn_implementation = "sdpa"
    return model, reference


def assert_as_close_as_bf16_allows(model, reference):
    """The packed row in bf16 errs from the fp32 examples-alone truth no more than the examples alone in bf16 do
    (3× and a little slack: a document that sees another one moves losses by whole units)."""
    truth, truth_grads = losses_and_grads(reference, packed=False)
    packed, packed_grads = losses_and_grads(model, packed=True)
    alone, alone_grads = losses_and_grads(model, packed=False)
    assert packed.shape == truth.shape == alone.shape
    loss_err, loss_base = (packed - truth).abs().max(), (alone - truth).abs().max()
    grad_err, grad_base = ((g - truth_grads).norm() / truth_grads.norm() for g in (packed_grads, alone_grads))
    assert loss_err <= 3 * loss_base + 0.05, (loss_err, loss_base)
    assert grad_err <= 3 * grad_base + 1e-2, (grad_err, grad_base)


def assert_packed_equals_alone_fp32(model, tol: float):
    packed, packed_grads = losses_and_grads(model, packed=True)
    alone, alone_grads = losses_and_grads(model, packed=False)
    torch.testing.assert_close(packed, alone, atol=tol, rtol=tol)
    torch.testing.assert_close(packed_grads, alone_grads, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_cuda_sdpa_packed_row_is_one_varlen_call_per_layer_in_bf16(monkeypatch):
    if openelm.varlen_attn is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("varlen_attn's flash kernel needs an Ampere or newer GPU")
    real, calls = openelm.varlen_attn, []

    def counted(*args, **kwargs):
        calls.append(args[3].tolist())  # cu_seq_q
        return real(*args, **kwargs)

    monkeypatch.setattr(openelm, "varlen_attn", counted)
    model, reference = bf16_and_fp32_models("sdpa")
    assert openelm.packed_sdpa_path(torch.empty(1, 1, 1, 16, device="cuda", dtype=torch.bfloat16)) == "varlen"
    assert_as_close_as_bf16_allows(model, reference)
    bounds = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    assert calls == [bounds] * model.config.num_transformer_layers  # the packed forward only: one call per layer


@pytest.mark.gpu
@pytest.mark.parametrize("path", [None, "loop"])
def test_cuda_sdpa_packed_row_in_fp32_equals_examples_alone(monkeypatch, path):
    """fp32 on the GPU takes the mask path by default (one SDPA call); the per-document loop agrees too."""
    monkeypatch.setattr(openelm, "PACKED_SDPA_PATH", path)
    model = tiny_model().cuda()
    model.config._attn_implementation = "sdpa"
    if path is None:
        assert openelm.packed_sdpa_path(torch.empty(1, 1, 1, 16, device="cuda")) == "mask"
    assert_packed_equals_alone_fp32(model, tol=1e-4)


@pytest.mark.gpu
def test_flash_attention_2_packed_row_keeps_documents_apart():
    pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash_attn package, not installed here")
    model, reference = bf16_and_fp32_models("flash_attention_2")
    assert_as_close_as_bf16_allows(model, reference)
    # and it agrees with SDPA's packed path on the same bf16 weights
    flash, flash_grads = losses_and_grads(model, packed=True)
    model.config._attn_implementation = "sdpa"
    sdpa, sdpa_grads = losses_and_grads(model, packed=True)
    assert (flash - sdpa).abs().max() <= 0.1 + 0.02 * sdpa.abs().max()
    assert (flash_grads - sdpa_grads).norm() <= 0.03 * sdpa_grads.norm()


@pytest.mark.gpu
def test_flex_attention_packed_gradients_equal_examples_alone():
    """FlexAttention has no CPU backward; on the GPU its per-document BlockMask must give exact gradients."""
    model = tiny_model().cuda()
    model.config._attn_implementation = "flex_attention"
    assert_packed_equals_alone_fp32(model, tol=1e-3)
