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
