"""The preallocated KV cache against the reference path (a dynamic cache): same greedy tokens, logits equal to
rounding."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from elmtune.models.decode import PreallocatedCache, PreallocatedLayer
from tests.helpers import tiny_model


def _generate(model, ids, mask, fast: bool, reserve: int | None = None, new_tokens: int = 12):
    cache = (PreallocatedCache(model.config, reserve=ids.shape[1] + new_tokens if reserve is None else reserve)
             if fast else DynamicCache(config=model.config))
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1), cache


def _left_padded(rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("reserve", [None, 3])  # room for the whole run; too little (the buffers must grow)
def test_fast_decode_matches_the_reference_path(implementation, reserve):
    model = tiny_model(attn_implementation=implementation)
    ids, mask = _left_padded([[1, 5, 9, 13, 40, 41], [1, 7, 3], [1, 60, 61, 62, 63]])  # padded rows: masked steps
    ref_tokens, ref_logits, _ = _generate(model, ids, mask, fast=False)
    tokens, logits, cache = _generate(model, ids, mask, fast=True, reserve=reserve)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert isinstance(cache.layers[0], PreallocatedLayer)
    assert cache.get_seq_length() == ids.shape[1] + 12 - 1  # the last token is never fed back
    if reserve is None:  # the room reserved at the first update was enough: no reallocation
        assert cache.layers[0]._keys.shape[-2] == ids.shape[1] + 12


def test_preallocated_layer_writes_in_place_and_takes_assigned_tensors():
    layer = PreallocatedLayer(reserve=8)
    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    keys, _ = layer.update(k, v)
    buffer = layer._keys
    assert buffer.shape[-2] == 8 and torch.equal(keys, k)
    keys, values = layer.update(k[..., :1, :], v[..., :1, :])
    assert layer._keys is buffer and keys.shape[-2] == 4  # written in place, a view of the filled length
    assert torch.equal(values[..., 3:, :], v[..., :1, :])
    layer.batch_select_indices(torch.tensor([1]))  # as beam search and the server's engine do: assign new tensors
    assert layer.get_seq_length() == 4 and layer.keys.shape[0] == 1
    keys, _ = layer.update(k[1:, :, :1], v[1:, :, :1])  # full: grows, keeping what it held
    assert keys.shape[-2] == 5 and torch.equal(keys[..., :3, :], k[1:]) and torch.equal(keys[..., 4:, :], k[1:, :, :1])


# --- the C decode step (decode.stack_step) of a model prepared for 16-bit CPU decoding ----------------------------

def _prepared(dtype, **overrides):
    from elmtune.models import weights16

    model = tiny_model(**overrides).to(dtype)
    assert weights16.prepare(model)
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("reserve", [None, 3])  # room for the whole run; too little (the step grows the buffers)
def test_stack_step_matches_the_operator_path(cpu_kernel, stack_steps, monkeypatch, dtype, qk_norm, reserve):
    from elmtune.models import decode

    model = _prepared(dtype, normalize_qk_projections=qk_norm)
    # padded rows (masked steps); five rows: the products take a pass of four rows and one of one
    ids, mask = _left_padded([[1, 5, 9, 13, 40, 41], [1, 7, 3], [1, 60, 61, 62, 63], [1, 2], [1, 8, 9, 10, 11, 12]])
    for batch in ((ids[:1], mask[:1]), (ids, mask)):
        tokens, logits, cache = _generate(model, *batch, fast=True, reserve=reserve)
        assert stack_steps and all(stack_steps)  # every step after the prefill went through the C decode step
        stack_steps.clear()
        monkeypatch.setattr(decode, "STACK_STEP", False)
        ref_tokens, ref_logits, ref_cache = _generate(model, *batch, fast=True, reserve=reserve)
        monkeypatch.setattr(decode, "STACK_STEP", True)
        assert stack_steps and not any(stack_steps)
        stack_steps.clear()
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        for layer, ref_layer in zip(cache.layers, ref_cache.layers):  # the cache it wrote: the same keys and values
            torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-5)


def test_stack_step_takes_the_engines_boolean_mask(cpu_kernel, stack_steps, monkeypatch):
    from elmtune.models import decode

    model = _prepared(torch.float16)
    ids, mask = _left_padded([[1, 5, 9, 13, 40, 41], [1, 7, 3]])
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(decode, "STACK_STEP", fused)
        cache = PreallocatedCache(model.config, reserve=8)
        with torch.no_grad():
            model(ids, attention_mask=mask, cache=cache)
            step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1).bool()[:, None, None, :]
            outs.append(model(torch.tensor([[4], [5]]), attention_mask=step_mask, cache=cache,
                              position_ids=torch.tensor([[6], [3]])).logits)
    assert stack_steps == [True, False]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_stack_step_is_not_taken_where_it_does_not_apply(cpu_kernel, stack_steps, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from elmtune.models import decode

    surveys = []
    survey = decode._stack_plan
    monkeypatch.setattr(decode, "_stack_plan", lambda model: surveys.append(model) or survey(model))

    ids = torch.tensor([[1, 5, 9]])
    fp32, prepared = tiny_model(), _prepared(torch.float16)
    adapted = get_peft_model(_prepared(torch.float16), LoraConfig(r=2, target_modules=["out_proj"],
                                                                  init_lora_weights=False))
    for model, cache in ((fp32, PreallocatedCache(fp32.config, reserve=8)),  # fp32 weights: not prepared
                         (adapted, PreallocatedCache(fp32.config, reserve=8)),  # an adapter wraps some projections
                         (prepared, DynamicCache(config=prepared.config))):  # the reference cache
        with torch.no_grad():
            model(ids, cache=cache)
            model(torch.tensor([[4]]), cache=cache)
            model(torch.tensor([[5]]), cache=cache)
    # the fp32 and adapted models' steps were declined, each model surveyed once; a dynamic cache's never offered
    assert stack_steps == [False] * 4 and len(surveys) == 2


def test_stack_step_broadcasts_one_position_and_checks_token_ids(cpu_kernel, stack_steps, monkeypatch):
    from elmtune.models import decode

    model = _prepared(torch.float16)
    ids = torch.tensor([[1, 5, 9], [1, 7, 3]])
    outs = []
    with torch.no_grad():
        for fused in (True, False):
            monkeypatch.setattr(decode, "STACK_STEP", fused)
            cache = PreallocatedCache(model.config, reserve=8)
            model(ids, cache=cache)
            # int32 ids, no mask, one [1, 1] position for both rows (what the model derives without a mask)
            outs.append(model(torch.tensor([[4], [6]], dtype=torch.int32), cache=cache).logits)
        monkeypatch.setattr(decode, "STACK_STEP", True)
        with pytest.raises(IndexError):  # as the embedding itself refuses it
            model(torch.tensor([[4], [model.config.vocab_size]]), cache=cache)
    assert stack_steps[:2] == [True, False]
    assert cache.get_seq_length() == 4  # the refused step wrote nothing
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_stack_step_takes_embeddings_instead_of_ids(cpu_kernel, stack_steps):
    model = _prepared(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 13]])
    outs = []
    with torch.no_grad():
        for by_embeddings in (False, True):
            cache = PreallocatedCache(model.config, reserve=8)
            model(ids, cache=cache)
            token = torch.tensor([[7]])
            given = {"inputs_embeds": model.get_input_embeddings()(token)} if by_embeddings else {"input_ids": token}
            outs.append(model(cache=cache, **given).logits)
    assert stack_steps == [True, True]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # the same fp32 rows, however they come in


def test_stack_step_follows_a_weight_replaced_between_steps(cpu_kernel, stack_steps, monkeypatch):
    from elmtune.models import decode

    outs = []
    with torch.no_grad():
        for fused in (True, False):
            monkeypatch.setattr(decode, "STACK_STEP", fused)
            model = _prepared(torch.float16)
            cache = PreallocatedCache(model.config, reserve=8)
            model(torch.tensor([[1, 5, 9]]), cache=cache)
            model(torch.tensor([[4]]), cache=cache)  # the C step makes its plan here
            projection = model.transformer.layers[0].attn.out_proj
            projection.weight.data = projection.weight.data.flip(0).contiguous()  # new storage, new values
            outs.append(model(torch.tensor([[6]]), cache=cache).logits)
    assert stack_steps == [True, True, False, False]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
