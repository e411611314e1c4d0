"""Behaviour of the native OpenELM on tiny random models: caching, padding, packing, dtypes, long contexts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig

from tests.helpers import tiny_model

GREEDY = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)


def greedy_with_cache(model, ids: torch.Tensor, steps: int):
    """Prefill once, then feed one token at a time through a DynamicCache: tokens and each step's logits."""
    cache = DynamicCache(config=model.config)
    logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
    tokens, step_logits = [], []
    for _ in range(steps):
        step_logits.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = model(nxt, cache=cache, use_cache=True).logits[:, -1]
    return torch.cat(tokens, 1), torch.stack(step_logits, 1)


def greedy_recompute(model, ids: torch.Tensor, steps: int):
    """The same decode, recomputing the whole sequence at every step (no cache)."""
    tokens, step_logits = [], []
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits[:, -1]
        step_logits.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        ids = torch.cat([ids, nxt], 1)
    return torch.cat(tokens, 1), torch.stack(step_logits, 1)


@torch.no_grad()
def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_model()
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    cached_tokens, cached_logits = greedy_with_cache(model, ids, 12)
    full_tokens, full_logits = greedy_recompute(model, ids, 12)
    assert torch.equal(cached_tokens, full_tokens)
    assert (cached_logits - full_logits).abs().max() <= 1e-4
    # and transformers' generate() drives the same cache path to the same tokens
    generated = model.generate(ids, generation_config=GREEDY, max_new_tokens=12)
    assert torch.equal(generated[:, ids.shape[1]:], full_tokens)


@torch.no_grad()
def test_left_padded_batch_matches_each_prompt_alone():
    model = tiny_model()
    prompts = [[1, 5, 9, 17, 33, 40, 41], [1, 7, 8], [1, 60, 61, 62, 63]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch_logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(batch_logits).all()
    batch_out = model.generate(ids, attention_mask=mask, generation_config=GREEDY, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt])).logits[0]
        assert (batch_logits[row, width - len(prompt):] - alone).abs().max() <= 1e-4
        alone_out = model.generate(torch.tensor([prompt]), generation_config=GREEDY, max_new_tokens=10)
        assert batch_out[row, width:].tolist() == alone_out[0, len(prompt):].tolist()


@torch.no_grad()
def test_packed_row_equals_documents_alone():
    model = tiny_model()
    docs = [[1, 5, 9, 17, 33], [1, 7, 8], [1, 60, 61, 62, 63, 64, 65]]
    packed = torch.tensor([sum(docs, [])])
    positions = torch.tensor([sum((list(range(len(d))) for d in docs), [])])
    logits = model(packed, position_ids=positions).logits[0]
    start = 0
    for doc in docs:
        alone = model(torch.tensor([doc])).logits[0]
        assert (logits[start:start + len(doc)] - alone).abs().max() <= 1e-4
        start += len(doc)
    # Without the restarting positions, the later documents would see the earlier ones: the check can fail.
    unpacked = model(packed).logits[0]
    assert (unpacked[5:8] - model(torch.tensor([docs[1]])).logits[0]).abs().max() > 1e-2


def test_packed_attention_on_cpu_runs_16_bit_inputs_in_fp32_even_under_autocast():
    """The CPU flash-attention backward is much faster in fp32 than in bf16, so packed rows are attended in fp32
    (from the same bf16 inputs) — autocast, which casts SDPA's inputs down, must not undo that."""
    from elmtune.models.openelm import packed_sdpa_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 24, 16, generator=g).to(torch.bfloat16) for h in (4, 2, 2))
    bounds = [0, 10, 24]
    expected = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b].float(), k[:, :, a:b].float(),
                                                         v[:, :, a:b].float(), is_causal=True, enable_gqa=True)
                          for a, b in zip(bounds[:-1], bounds[1:])], dim=2).transpose(1, 2).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_sdpa_attention(None, q, k, v, bounds, q.shape[-1] ** -0.5)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@torch.no_grad()
def test_long_prompt_and_cached_decoding_past_apples_limits():
    """Apple's code breaks past 2,048 cached / 4,096 prompt tokens; ours takes 8,192 and keeps going."""
    model = tiny_model(num_transformer_layers=1)
    ids = torch.randint(3, 96, (1, 8192), generator=torch.Generator().manual_seed(2))
    cached_tokens, cached_logits = greedy_with_cache(model, ids, 4)
    full_tokens, full_logits = greedy_recompute(model, ids, 4)
    assert torch.equal(cached_tokens, full_tokens)
    assert (cached_logits - full_logits).abs().max() <= 1e-4


def test_loss_is_fp32_and_exact_for_bf16_weights():
    model = tiny_model().to(torch.bfloat16)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    expected = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, 96), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - expected.item()) <= 1e-6


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.25), (torch.float16, 0.05)])
def test_half_precision_forward_backward_close_to_fp32(dtype, tol):
    model = tiny_model()
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(ids).logits
    half = tiny_model().to(dtype).train()
    out = half(ids, labels=ids)
    out.loss.backward()
    assert (out.logits.float() - reference).abs().max() <= tol
    grads = [p.grad for p in half.parameters()]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    results = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.transformer.layers)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


@torch.no_grad()
def test_untied_head_uses_lm_head():
    model = tiny_model(share_input_output_layers=False)
    assert "lm_head.weight" in model.state_dict()
    ids = torch.tensor([[1, 2, 3]])
    hidden = model.transformer(ids).last_hidden_state
    assert torch.allclose(model(ids).logits, hidden @ model.lm_head.weight.T, atol=1e-6)


def _reference_rms_norm(x, weight, eps):
    """The arithmetic of Apple's RMSNorm, composed from autograd ops."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_lean_rms_norm_matches_the_composed_one_with_its_gradients(dtype, tol):
    from elmtune.models.openelm import OpenELMRMSNorm, _RMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=dtype) * 3
    weight = (torch.rand(64, dtype=dtype) + 0.5).requires_grad_()
    grad = torch.randn(3, 5, 64, dtype=dtype)
    results = []
    for norm in (_reference_rms_norm, _RMSNorm.apply):
        xi, wi = x.clone().requires_grad_(), weight.detach().clone().requires_grad_()
        out = norm(xi, wi, 1e-6)
        out.backward(grad)
        results.append((out, xi.grad, wi.grad))
    for ours, reference in zip(results[1], results[0]):
        assert ours.dtype == reference.dtype
        torch.testing.assert_close(ours, reference, rtol=tol, atol=tol)
    norm = OpenELMRMSNorm(64, eps=1e-6).to(dtype)
    norm.weight.data.copy_(weight.detach())
    with torch.no_grad():  # inference takes the composed ops: bitwise the same forward
        assert torch.equal(norm(x), _RMSNorm.apply(x, weight.detach(), 1e-6))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _RMSNorm.apply(x.clone().requires_grad_(), weight, 1e-6)
    assert sum(t.numel() for t in saved) == x.numel() + 64 + 15  # x, weight and one inverse RMS per row


def test_gated_activation_keeps_less_and_gives_the_same_gradients():
    from elmtune.models.openelm import _GatedActivation

    torch.manual_seed(0)
    gate, up = torch.randn(2, 7, 48, dtype=torch.float64), torch.randn(2, 7, 48, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda g, u: _GatedActivation.apply(g, u, F.silu),
                                    (gate.requires_grad_(), up.requires_grad_()))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _GatedActivation.apply(gate, up, F.silu)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}  # no act(gate)
