"""Packed rows are attended document by document under every attention implementation, or refused — never mixed.

A packed row (PackedCollator: one row, position ids restarting at 0 per example) must give exactly the per-token
losses and gradients of its examples run one at a time.  Flash kernels cannot run here, so a CPU stand-in with
flash semantics (documents only from the varlen boundaries it is handed, else causal over the whole row) checks
that the boundaries reach flash-style implementations; a spy on every registered implementation checks that none
gets a packed row without boundaries or a per-document mask.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from torch.nn.attention.flex_attention import BlockMask

import elmtune.models.openelm as openelm
from elmtune.data.collate import PackedCollator
from tests.helpers import tiny_model

EXAMPLES = [  # (input_ids, labels): prompt masked, answer + eos supervised; one example is a single token
    ([1, 5, 9, 17, 33, 2], [-100, -100, -100, 17, 33, 2]),
    ([1, 7, 8, 2], [-100, -100, 8, 2]),
    ([1], [-100]),
    ([1, 60, 61, 62, 63, 64, 65, 2], [-100, -100, -100, -100, 63, 64, 65, 2]),
]
BATCH = PackedCollator()([{"input_ids": i, "labels": l} for i, l in EXAMPLES])
BOUNDS = [0, 6, 10, 11, 19]  # where each example starts in the packed row, and its end
DOCUMENT = torch.repeat_interleave(torch.arange(len(EXAMPLES)), torch.tensor([len(i) for i, _ in EXAMPLES]))
STANDIN = "elmtune_cpu_varlen_standin"


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each supervised next-token prediction, in order."""
    targets = labels[1:]
    losses = F.cross_entropy(logits[:-1].float(), targets.clamp(min=0), reduction="none")
    return losses[targets != -100]


def losses_and_grads(model, packed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token losses of the examples (one packed row, or each alone) and the gradients of their sum."""
    model.zero_grad(set_to_none=True)
    if packed:
        logits = model(BATCH["input_ids"], position_ids=BATCH["position_ids"]).logits[0]
        losses = per_token_losses(logits, BATCH["labels"][0])
    else:
        losses = torch.cat([per_token_losses(model(torch.tensor([i])).logits[0], torch.tensor(l)) for i, l in EXAMPLES])
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_packed_equals_alone(model, tol: float = 1e-5):
    packed, packed_grads = losses_and_grads(model, packed=True)
    alone, alone_grads = losses_and_grads(model, packed=False)
    assert packed.shape == alone.shape == (9,)
    assert (packed - alone).abs().max() <= tol
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) > 0
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=tol, rtol=tol, msg=name)


def causal_standin(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                   cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """What a flash varlen kernel does, on the CPU: ``[b, h, s, d]`` → ``[b, s, h, d]``, causal within each
    sequence of ``cu_seq_lens`` over the flattened tokens, or within each row when it gets no boundaries."""
    assert attention_mask is None  # flash-style: transformers builds no mask for an unpadded row
    b, h, s, d = query.shape
    if cu_seq_lens_q is None:
        bounds = list(range(0, b * s + 1, s))
    else:
        assert cu_seq_lens_q.dtype == torch.int32 and cu_seq_lens_q.device == query.device
        assert torch.equal(cu_seq_lens_q, cu_seq_lens_k) and int(cu_seq_lens_q[-1]) == b * s
        bounds = cu_seq_lens_q.tolist()
        assert max_length_q == max_length_k == max(y - x for x, y in zip(bounds[:-1], bounds[1:]))
    q, k, v = (x.transpose(1, 2).reshape(b * s, x.shape[1], d).transpose(0, 1)[None] for x in (query, key, value))
    out = torch.cat([F.scaled_dot_product_attention(q[:, :, x:y], k[:, :, x:y], v[:, :, x:y], is_causal=True,
                                                    scale=scaling, enable_gqa=True)
                     for x, y in zip(bounds[:-1], bounds[1:])], dim=2)  # [1, h, b*s, d]
    return out[0].transpose(0, 1).reshape(b, s, h, d), None


@pytest.fixture
def standin():
    """The stand-in, registered as a flash-style implementation (its mask function is transformers' flash one)."""
    AttentionInterface.register(STANDIN, causal_standin)
    AttentionMaskInterface.register(STANDIN, flash_attention_mask)
    yield STANDIN
    del AttentionInterface._global_mapping[STANDIN], AttentionMaskInterface._global_mapping[STANDIN]


def test_a_flash_style_implementation_gets_the_documents_boundaries(standin):
    model = tiny_model()
    model.config._attn_implementation = standin  # the setter: no flash-attn availability check
    assert_packed_equals_alone(model)
    # the stand-in does mix documents when it is handed no boundaries, as a flash kernel would
    with torch.no_grad():
        row = model(BATCH["input_ids"]).logits[0]
        second = model(torch.tensor([EXAMPLES[1][0]])).logits[0]
    assert (row[6:10] - second).abs().max() > 1e-2
    assert openelm.takes_varlen_kwargs(standin) and not openelm.takes_varlen_kwargs("sdpa")


@pytest.mark.parametrize("implementation, path", [("eager", None), ("sdpa", None), ("sdpa", "mask"),
                                                  ("sdpa", "loop")])
def test_packed_row_equals_examples_alone_in_losses_and_gradients(monkeypatch, implementation, path):
    monkeypatch.setattr(openelm, "PACKED_SDPA_PATH", path)
    model = tiny_model()
    model.config._attn_implementation = implementation
    assert_packed_equals_alone(model)


@pytest.mark.parametrize("implementation", [STANDIN, "sdpa", "eager"])
@torch.no_grad()
def test_several_packed_rows_keep_their_documents_apart(standin, implementation):
    """Two rows of packed documents: flash-style kernels get the boundaries over the flattened rows, the others
    transformers' per-document mask."""
    model = tiny_model()
    model.config._attn_implementation = implementation
    rows = [[EXAMPLES[0][0], EXAMPLES[1][0]], [EXAMPLES[3][0], [1], [1]]]  # 10 tokens each
    ids = torch.tensor([sum(docs, []) for docs in rows])
    positions = torch.tensor([[p for doc in docs for p in range(len(doc))] for docs in rows])
    logits = model(ids, position_ids=positions).logits
    for row, docs in enumerate(rows):
        alone = torch.cat([model(torch.tensor([doc])).logits[0] for doc in docs])
        assert (logits[row] - alone).abs().max() <= 1e-5


def test_the_packed_sdpa_path_is_the_cpu_loop_by_default():
    q = torch.zeros(1, 2, 4, 16)
    assert openelm.packed_sdpa_path(q) == "loop" and openelm.packed_sdpa_path(q.bfloat16()) == "loop"


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="flex_attention compiles with inductor, "
                    "which needs a C++ compiler on the CPU; none found")
@torch.no_grad()
def test_flex_attention_packed_losses_equal_examples_alone():
    """Forward only: in torch 2.13 FlexAttention has no backward on the CPU (NotImplementedError); the gradients are
    checked on a GPU (tests/models/test_gpu_attention.py)."""
    model = tiny_model()
    model.config._attn_implementation = "flex_attention"
    packed = per_token_losses(model(BATCH["input_ids"], position_ids=BATCH["position_ids"]).logits[0],
                              BATCH["labels"][0])
    model.config._attn_implementation = "eager"
    alone = torch.cat([per_token_losses(model(torch.tensor([i])).logits[0], torch.tensor(l)) for i, l in EXAMPLES])
    assert (packed - alone).abs().max() <= 1e-5


def blocks_every_other_document(mask) -> bool:
    """Whether a mask handed to attention lets each token see exactly its own document's past."""
    t = len(DOCUMENT)
    allowed = (DOCUMENT[:, None] == DOCUMENT[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    if isinstance(mask, BlockMask):
        idx = torch.arange(t)
        dense = mask.mask_mod(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])
    elif torch.is_tensor(mask) and mask.ndim == 4:
        dense = mask[0, 0, :, :t] if mask.dtype == torch.bool else mask[0, 0, :, :t] == 0
    else:
        return False
    return torch.equal(dense.bool().expand(t, t), allowed)


def only_in_attention_registry(module, query, key, value, attention_mask, **kwargs):
    """A custom kernel registered with no mask function: transformers builds it no mask."""
    return query.transpose(1, 2), None


@pytest.mark.parametrize("name", sorted({*ALL_ATTENTION_FUNCTIONS, "eager", "elmtune_unmasked_custom"}))
@torch.no_grad()
def test_no_implementation_gets_a_packed_row_without_boundaries(monkeypatch, name):
    """Every registered implementation (spied on, not run) either is refused, or receives the documents'
    boundaries or a mask closed across documents, or (our CPU SDPA path) gives each document's own output."""
    if name == "elmtune_unmasked_custom":
        monkeypatch.setitem(AttentionInterface._global_mapping, name, only_in_attention_registry)  # register()
    if name == "flex_attention" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("flex_attention's BlockMask is compiled with inductor, which needs a C++ compiler; none found")
    model = tiny_model()
    alone = torch.cat([model(torch.tensor([i])).logits[0] for i, _ in EXAMPLES])  # transformers' SDPA, unspied
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((attention_mask, kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"),
                      kwargs.get("max_length_q")))
        return torch.zeros_like(query.transpose(1, 2)), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, name, spy)  # ahead of the registered function
    model.config._attn_implementation = name
    try:
        logits = model(BATCH["input_ids"], position_ids=BATCH["position_ids"]).logits
    except ValueError as refused:
        assert name in str(refused) and "--no-packing" in str(refused)
        return
    if not calls:  # the attention never went through the registry: it must be our exact packed path
        assert name == "sdpa" and (logits[0] - alone).abs().max() <= 1e-5
        return
    assert len(calls) == model.config.num_transformer_layers
    for mask, cu_q, cu_k, longest in calls:
        given_bounds = cu_q is not None and cu_q.tolist() == cu_k.tolist() == BOUNDS and longest == 8
        assert given_bounds or blocks_every_other_document(mask), f"{name} got a packed row without boundaries"


def test_the_mask_check_rejects_masks_that_let_documents_mix():
    t = len(DOCUMENT)
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    assert not blocks_every_other_document(causal) and not blocks_every_other_document(None)
    assert blocks_every_other_document(causal & (DOCUMENT[:, None] == DOCUMENT[None, :]))


@pytest.mark.parametrize("in_fp32", [True, False])
def test_cpu_packed_attention_in_bf16_either_way_matches_fp32(monkeypatch, in_fp32):
    """Both precisions packed attention may take for bf16 inputs on a CPU (chosen by a measured probe) give the fp32
    reference's outputs and input gradients to bf16's rounding."""
    monkeypatch.setattr(openelm, "CPU_ATTENTION_IN_FP32", in_fp32)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 19, 16, generator=generator) for heads in (4, 2, 2))

    def attend(dtype):
        inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = openelm.packed_sdpa_attention(None, *inputs, BOUNDS, 0.25)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.float(), [x.grad.float() for x in inputs]

    reference, reference_grads = attend(torch.float32)
    out, grads = attend(torch.bfloat16)
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=3e-2, atol=3e-2)


def test_cpu_attention_precision_follows_the_measurement(monkeypatch):
    import elmtune.hardware as hardware

    openelm._measured_attention_in_fp32.cache_clear()
    seen = []
    for faster in (True, False):
        monkeypatch.setattr(hardware, "measured", lambda name, inputs, measure, device="cpu", faster=faster: (
            seen.append((name, inputs)) or {"fp32": faster}))
        openelm._measured_attention_in_fp32.cache_clear()
        assert openelm.cpu_attention_in_fp32(torch.bfloat16, 12, 3, 64) is faster
    assert seen[0] == ("cpu-attention-precision", {"dtype": "torch.bfloat16", "query_heads": 12, "kv_heads": 3,
                                                   "head_dim": 64})
    monkeypatch.setattr(hardware, "measured", lambda *a, **k: None)  # probing off: fp32, which rounds less
    openelm._measured_attention_in_fp32.cache_clear()
    assert openelm.cpu_attention_in_fp32(torch.bfloat16, 12, 3, 64) is True
    openelm._measured_attention_in_fp32.cache_clear()


def test_the_cpu_attention_probe_measures_both_precisions(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMTUNE_CACHE_DIR", str(tmp_path))
    openelm._measured_attention_in_fp32.cache_clear()
    choice = openelm.cpu_attention_in_fp32(torch.bfloat16, 2, 1, 8)
    (file,) = (tmp_path / "probes").glob("cpu-attention-precision-*.json")
    result = __import__("json").loads(file.read_text())["result"]
    assert result["fp32_s"] > 0 and result["bfloat16_s"] > 0
    assert choice == (result["bfloat16_s"] >= (1 - openelm.NATIVE_MARGIN) * result["fp32_s"]) == result["fp32"]
    openelm._measured_attention_in_fp32.cache_clear()


def test_the_attention_probe_runs_clean_inside_checkpointing_and_no_grad(tmp_path, monkeypatch):
    """The probe is first needed lazily, inside a training forward: under non-reentrant activation checkpointing
    its own tensors must not be recorded with the layer's (the recomputation would count 82 against 22 and fail),
    and under no_grad its backward must still work."""
    import shutil

    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("ELMTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ELMTUNE_PROBE", "1")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 19, 16, generator=generator).bfloat16().requires_grad_() for heads in (4, 2, 2))

    def attend(*inputs):
        return openelm.packed_sdpa_attention(None, *inputs, BOUNDS, 0.25)

    try:
        openelm._measured_attention_in_fp32.cache_clear()
        checkpoint(attend, q, k, v, use_reentrant=False).float().sum().backward()  # measured inside, recomputed
        assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))
        assert list((tmp_path / "probes").glob("cpu-attention-precision-*.json"))
        openelm._measured_attention_in_fp32.cache_clear()
        shutil.rmtree(tmp_path / "probes")
        with torch.no_grad():  # measured inside no_grad (an evaluation before any training step)
            attend(q, k, v)
        assert list((tmp_path / "probes").glob("cpu-attention-precision-*.json"))
    finally:
        openelm._measured_attention_in_fp32.cache_clear()


def test_the_attention_probe_is_settled_at_setup_for_every_layer_shape(tmp_path, monkeypatch):
    """Taken at setup, not first inside a forward: under torchrun the probe is a collective every rank must reach."""
    from tests.helpers import tiny_config

    monkeypatch.setenv("ELMTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ELMTUNE_PROBE", "1")
    config = tiny_config(num_transformer_layers=3, qkv_multipliers=[0.5, 1.0])
    shapes = set(zip(config.num_query_heads, config.num_kv_heads))
    try:
        openelm._measured_attention_in_fp32.cache_clear()
        openelm.settle_cpu_attention(config, torch.float32, torch.device("cpu"))  # fp32: nothing to decide
        assert openelm._measured_attention_in_fp32.cache_info().currsize == 0
        openelm.settle_cpu_attention(config, torch.bfloat16, torch.device("cpu"))
        assert openelm._measured_attention_in_fp32.cache_info().currsize == len(shapes) > 1
    finally:
        openelm._measured_attention_in_fp32.cache_clear()
