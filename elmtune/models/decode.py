"""The single-token decode step without per-step allocation: a preallocated KV cache.

At batch 1 a decode step is a matrix-vector product per weight: its time is the weights' bytes over the memory
bandwidth, and everything else is overhead to remove.  For ``generate``, ``chat`` and the server's engine alike,
:class:`PreallocatedCache` is — a drop-in :class:`~transformers.DynamicCache` whose layers write each step's key
and value in place into buffers reserved ahead (``reserve`` tokens: the prompt plus ``max_new_tokens``), instead
of concatenating (``torch.cat`` copies the whole cache and allocates a new one at every step and layer).  The
keys it hands to attention are views of exactly the filled length, so attention and masks see what a dynamic
cache gives them; code that assigns a layer's ``keys`` / ``values`` (the engine's merge and trim, beam reorders)
keeps working: the assigned tensor becomes the buffer.

One-query attention as two small matmuls (GQA by a view) instead of SDPA's CPU flash kernel was tried and
measured slower on a shared 2-core AVX2 EPYC (1.25 s against 0.71 s median per 270M fp32 step, 2 threads: more
parallel regions per step), so decode steps keep going through the attention interface.

It is an exact rewrite of the reference path (dynamic cache): the same greedy tokens, logits equal to rounding
(tests/models/test_decode.py holds it to that).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

#: Extra room a buffer gets when it must grow past its reservation (tokens), so growing is rare.
GROW_BY = 256


class PreallocatedLayer(DynamicLayer):
    """A dynamic layer over reserved buffers: ``keys`` / ``values`` are views of the first ``length`` positions."""

    def __init__(self, reserve: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.reserve = reserve

    # keys / values are views of the buffers; assigning one (the engine, beam search) makes it the new buffer.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[..., : self.length, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys = value
        self.length = 0 if value is None else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[..., : self.length, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values = value  # keys and values are always assigned together; keys set the length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def _make_room(self, needed: int) -> None:
        capacity = self._keys.shape[-2]
        if needed <= capacity:
            return
        size = max(needed, self.reserve) if capacity == 0 else needed + GROW_BY
        length = self.length
        keys = self._keys.new_empty((*self._keys.shape[:-2], size, self._keys.shape[-1]))
        values = self._values.new_empty((*self._values.shape[:-2], size, self._values.shape[-1]))
        keys[..., :length, :] = self._keys[..., :length, :]
        values[..., :length, :] = self._values[..., :length, :]
        self._keys, self._values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self._make_room(end)
        self._keys[..., start:end, :] = key_states
        self._values[..., start:end, :] = value_states
        self.length = end
        return self.keys, self.values


class PreallocatedCache(DynamicCache):
    """A :class:`~transformers.DynamicCache` whose layers fill reserved buffers in place (see module doc).

    ``reserve`` is the number of tokens to make room for at the first update (prompt + new tokens); a longer run
    still works (a layer grows by :data:`GROW_BY` at a time)."""

    def __init__(self, config=None, reserve: int = 0):
        super().__init__(config=config)
        self.layers = [PreallocatedLayer(reserve) for _ in self.layers]
        self.layer_class_to_replicate = None
        self.reserve = reserve

