"""The single-token decode step without per-step allocation: a preallocated KV cache.

At batch 1 a decode step is a matrix-vector product per weight: its time is the weights' bytes over the memory
bandwidth, and everything else is overhead to remove.  For ``generate``, ``chat`` and the server's engine alike,
:class:`PreallocatedCache` is — a drop-in :class:`~transformers.DynamicCache` whose layers write each step's key
and value in place into buffers reserved ahead (``reserve`` tokens: the prompt plus ``max_new_tokens``), instead
of concatenating (``torch.cat`` copies the whole cache and allocates a new one at every step and layer).  The
keys it hands to attention are views of exactly the filled length, so attention and masks see what a dynamic
cache gives them; code that assigns a layer's ``keys`` / ``values`` (the engine's merge and trim, beam reorders)
keeps working: the assigned tensor becomes the buffer.

It is an exact rewrite of the reference path (dynamic cache): the same greedy tokens, logits equal to rounding
(tests/models/test_decode.py holds it to that).

On a CPU, a model prepared for 16-bit weights with fp32 arithmetic (:func:`elmtune.models.weights16.prepare`:
what ``generate``, ``chat`` and ``serve`` load there) takes its one-token steps through :func:`stack_step`: the
embedding, every decoder layer and the final norm in one call into :file:`kernels/decode_step.c`, instead of ~50
PyTorch operators per layer.  Measured per 270M step at batch 1 on a 2-core AVX2 EPYC, those operators cost ~18
ms on top of the ~30 ms the weights take to stream — ~8 µs each, ~16 µs with the caches just flushed by that
stream — and the C step over the layers takes 0.1-2.6 ms more than streaming their weights alone.  It writes the same cache buffers and
computes the reference arithmetic in the same order, equal up to fp32 summation order (tests/models/test_decode.py
and the server's tests/serve/test_engine.py hold it to the operator path's tokens and logits).  Elsewhere (GPUs,
fp32 or PEFT-wrapped models, other caches) decode steps go through the operators as written in openelm.py.
"""

from __future__ import annotations

import ctypes
import operator
import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import weights16

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


#: Whether prepared models take their decode steps through :func:`stack_step` (tests turn it off to compare).
STACK_STEP = True


def _step_mask(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None | bool:
    """A decode step's mask as ``uint8 [batch, length]`` (1 = attend), None for no mask, False if not one of the
    forms a decode step gets: none, transformers' 2D padding mask, or the engine's boolean ``[b, 1, 1, t]``."""
    if attention_mask is None:
        return None
    if attention_mask.ndim == 4 and attention_mask.dtype == torch.bool and attention_mask.shape[1:3] == (1, 1):
        attention_mask = attention_mask[:, 0, 0]
    if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (batch, length):
        return False
    return attention_mask.to(torch.uint8).contiguous()


def stack_step(model, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               position_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor | None:
    """The decoder stack of ``model`` (an ``OpenELMModel``) on one new token per row, in one C call
    (:file:`kernels/decode_step.c`): embeddings, every layer, the final norm.

    ``input_ids [b, 1]`` (or fp32 ``inputs_embeds [b, 1, D]``), ``position_ids [b, 1]`` or ``[1, 1]``, ``cache``
    the :class:`PreallocatedCache` to write.  Returns the final norm's ``[b, 1, D]`` fp32 output, or None —
    nothing done — where the step does not apply: not a model prepared for 16-bit CPU decoding (every projection a
    ``Linear16`` with a contiguous 16-bit weight and no bias, plain fp32 norms, widths of multiples of 8, no forward
    hooks), not a SiLU-gated FFN, another cache or mask, gradients on."""
    given = input_ids if input_ids is not None else inputs_embeds
    b, s = given.shape[:2]
    if (not STACK_STEP or s != 1 or given.device.type != "cpu" or not isinstance(cache, PreallocatedCache)
            or torch.is_grad_enabled() or inputs_embeds is not None and inputs_embeds.dtype != torch.float32):
        return None
    layers = cache.layers
    length = layers[0].length if layers and layers[0].is_initialized else -1
    if length < 1 or len(layers) != len(model.layers) or any(
            not c.is_initialized or c.length != length or c._keys.shape[0] != b for c in layers):
        return None
    mask = _step_mask(attention_mask, b, length + 1)
    if mask is False:
        return None
    known, plan = _PLANS.get(cache, (None, None))
    if known is not model or plan is not None and not plan.current():  # ~2 ms for the 270M model: once per cache
        plan = _stack_plan(model)
        _PLANS[cache] = (model, plan)  # a model the step does not take is not surveyed again at every step
    if plan is None:
        return None
    if any(c._keys.shape[1::2] != (hkv, plan.head_dim) or c._values.shape != c._keys.shape
           for c, hkv in zip(layers, plan.dims[1::4])):
        return None
    library = weights16.loaded()[0]  # loaded: prepare() made the Linear16 layers the plan is built from
    width = model.config.model_dim
    ids = None
    if input_ids is not None and plan.table is not None:
        h, ids = torch.empty(b, width, dtype=torch.float32), input_ids.reshape(b).to(torch.int64).contiguous()
    else:  # the caller's embeddings, or an embedding the C step does not read itself (an adapter's, say)
        embeds = inputs_embeds if inputs_embeds is not None else model.token_embeddings(input_ids)
        h = embeds.reshape(b, width).to(torch.float32).clone(memory_format=torch.contiguous_format)
    positions = position_ids.reshape(-1).expand(b).to(torch.int64).contiguous()
    buffers = []
    for index, entry in enumerate(layers):
        entry._make_room(length + 1)
        if not (entry._keys.is_contiguous() and entry._values.is_contiguous()
                and entry._keys.dtype == entry._values.dtype == torch.float32):
            entry._keys, entry._values = entry._keys.contiguous().float(), entry._values.contiguous().float()
        buffers += [entry._keys.data_ptr(), entry._values.data_ptr()]
        plan.dims[4 * index + 3] = entry._keys.shape[-2]  # this layer's cache capacity
    status = library.elmtune_decode_step(
        h.data_ptr(), ids.data_ptr() if ids is not None else None, plan.table, plan.vocab, positions.data_ptr(),
        plan.inv_freq.data_ptr(), b, width, plan.head_dim, len(layers), plan.dims, plan.weights,
        (ctypes.c_void_p * len(buffers))(*buffers), length, mask.data_ptr() if mask is not None else None,
        plan.final_norm, plan.eps, plan.scaling, plan.bf16, torch.get_num_threads())
    if status == -2:
        raise IndexError(f"token id out of range for the embedding table of {plan.vocab} rows")
    if status:
        raise MemoryError("elmtune's decode step could not allocate its scratch memory")
    for entry in layers:
        entry.length = length + 1
    return h.reshape(b, 1, width)


#: Each cache's (model, plan or None where the step does not take that model; see :class:`_StackPlan`), made at
#: its first step; weakly keyed, so a copied cache makes its own and a finished one takes its plan with it.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _StackPlan:
    """What :func:`stack_step` hands the C step for a model, in its argument order (see decode_step.c)."""

    modules: list  # every module whose weight the pointers below point into ...
    tensors: list  # ... those weights, held: a replaced weight is never freed under the C step ...
    pointers: list  # ... and their data pointers when the plan was made
    weights: ctypes.Array  # 8 pointers per layer: attn_norm, ffn_norm, q_norm, k_norm, the four projections
    dims: ctypes.Array  # 4 per layer: query heads, key/value heads, FFN width, cache capacity (filled per step)
    table: int | None  # the 16-bit embedding table, or None if the embedding is not a plain Embedding16
    vocab: int
    final_norm: int
    inv_freq: torch.Tensor
    head_dim: int
    eps: float
    scaling: float
    bf16: bool

    def current(self) -> bool:
        """Whether every module still has the weight, at the address, the plan was made from (~20 µs a step)."""
        now = [module._parameters["weight"] for module in self.modules]
        return all(map(operator.is_, now, self.tensors)) and list(map(torch.Tensor.data_ptr, now)) == self.pointers


def _stack_plan(model) -> _StackPlan | None:
    """The plan of ``model``'s stack, or None if it is not in the form the C step takes (see :func:`stack_step`)."""
    from .openelm import OpenELMDecoderLayer, OpenELMRMSNorm, rotary_frequencies

    config = model.config
    if not config.ffn_with_glu or config.activation_fn_name not in ("swish", "silu") or config.model_dim % 8:
        return None
    weights, dims, norms, projections = [], [], [model.norm], []
    for layer in model.layers:
        attn, ffn = layer.attn, layer.ffn
        layer_projections = [attn.qkv_proj, attn.out_proj, ffn.proj_1, ffn.proj_2]
        layer_norms = [layer.attn_norm, layer.ffn_norm, attn.q_norm, attn.k_norm]
        if type(layer) is not OpenELMDecoderLayer or any(
                type(p) is not weights16.Linear16 or p.bias is not None for p in layer_projections) or any(
                n is not None and type(n) is not OpenELMRMSNorm for n in layer_norms):
            return None  # an adapter's wrapper, say: its own forward must run
        projections += layer_projections
        norms += [n for n in layer_norms if n is not None]
        weights += [n.weight.data_ptr() if n is not None else None for n in layer_norms]
        weights += [p.weight.data_ptr() for p in layer_projections]
        dims += [attn.num_q_heads, attn.num_kv_heads, ffn.proj_2.in_features, 0]
    dtypes = {p.weight.dtype for p in projections}
    embedding = model.token_embeddings
    if (len(dtypes) != 1 or not dtypes <= {torch.float16, torch.bfloat16} or config.head_dim % 8
            or any(width % 8 for width in dims[2::4])  # products and dot products read 8 values at a time
            or not all(p.weight.is_contiguous() for p in projections)
            or any(n.weight.dtype != torch.float32 or not n.weight.is_contiguous() for n in norms)
            or len({n.eps for n in norms}) != 1 or type(model.norm) is not OpenELMRMSNorm
            or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())):
        return None
    dtype = dtypes.pop()
    plain = (type(embedding) is weights16.Embedding16 and embedding.weight.dtype == dtype
             and embedding.weight.is_contiguous())
    modules = [*projections, *norms, *([embedding] if plain else [])]
    tensors = [module.weight for module in modules]
    return _StackPlan(modules=modules, tensors=tensors, pointers=[t.data_ptr() for t in tensors],
                      weights=(ctypes.c_void_p * len(weights))(*weights), dims=(ctypes.c_int64 * len(dims))(*dims),
                      table=embedding.weight.data_ptr() if plain else None, vocab=embedding.weight.shape[0],
                      final_norm=model.norm.weight.data_ptr(),
                      inv_freq=rotary_frequencies(config.head_dim, config.rope_freq_constant),
                      head_dim=config.head_dim, eps=norms[0].eps, scaling=model.layers[0].attn.scaling,
                      bf16=dtype == torch.bfloat16)
