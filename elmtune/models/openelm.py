"""Native OpenELM for transformers: no remote code, Apple's parameter names, Apple's numerics.

Module names are exactly the keys of Apple's checkpoints (``transformer.layers.N.attn.qkv_proj`` …), so Apple's
safetensors load as they are and PEFT targets read as in the tutorial.  Differences from Apple's reference code
are deliberate and output-preserving:

* RoPE is computed for the ``position_ids`` asked for (no 4,096-entry table, no length cliff), so packed rows and
  left-padded batches get the right positions;
* masks come from transformers' ``create_causal_mask`` (no ``[batch, 1, 2048, 2048]`` buffer): plain causal SDPA
  when nothing is padded, a padding mask otherwise;
* packed rows (position ids that restart where a new document begins, no cache, no padding) are attended
  exactly, document by document, whatever the implementation: the boundaries are found once per forward and reach
  the kernel — as varlen arguments (``cu_seq_lens_q/k``, ``max_length_q/k``) for flash-style kernels, which take
  no mask; as :func:`packed_sdpa_attention`'s split of a single row under SDPA; as transformers' per-document mask
  otherwise (eager, flex, SDPA on several rows).  An implementation that would get none is refused, not run;
* keys are cached after RoPE (standard transformers ``Cache``), and the loss is computed in fp32.

Shapes in comments: b = batch, s = new tokens, t = cached + new tokens, h = heads, d = head_dim, D = model_dim.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask, flash_attention_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep

from . import weights16
from .configuration_openelm import OpenELMConfig
from .decode import PreallocatedCache, stack_step

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch older than 2.10: packed rows on CUDA take the mask path
    varlen_attn = None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Apple's arithmetic: ``x / rms(x)`` in fp32, cast back, times ``weight``; also returns the inverse RMS."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    return (x32 * rstd).type_as(x) * weight, rstd


class _RMSNorm(torch.autograd.Function):
    """``x / rms(x)`` in fp32, cast back, times ``weight`` — saving only ``x`` and the ``[..., 1]`` inverse RMS.

    Composed from autograd ops, the same arithmetic keeps two fp32 copies of ``x`` for backward (8 bytes per
    element against ``x``'s 2 in bf16); here backward recomputes them from ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.float() * normed.type_as(x).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = (grad * weight).float()  # gradient at the fp32 normed value (the cast back is the identity)
        grad_x = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x.type_as(x), grad_weight, None


class OpenELMRMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the scale, as Apple's reference does."""

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _RMSNorm.apply(x, self.weight, self.eps)
        if x.dtype == self.weight.dtype == torch.float32:  # fp32 inference: the same arithmetic in one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # (8 ops → 1 per norm, 65 per decode step)
        return _rms_norm(x, self.weight, self.eps)[0]  # inference: no autograd Function per call


def rotary_frequencies(head_dim: int, base: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """RoPE's ``[d/2]`` inverse frequencies ``base^(-2i/d)``, in fp32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for the given positions, in fp32: ``position_ids [b, s]`` → two ``[b, 1, s, d]`` tensors.

    Computed per call for exactly the positions needed: no cached table, so no maximum length and no buffer
    to initialise (the model can be built on the meta device).
    """
    angles = position_ids[..., None].float() * rotary_frequencies(head_dim, base, position_ids.device)  # [b, s, d/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [b, 1, s, d]: Apple's "rotate half" layout
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [b, h, s, d]`` in fp32 (as Apple does, so bf16 runs lose no precision here)."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x32 * cos + rotated * sin).type_as(x)


class _GatedActivation(torch.autograd.Function):
    """``act(gate) * up``, keeping only ``gate`` and ``up`` for backward: ``act(gate)`` ([tokens, ffn], the widest
    activation of a layer) is recomputed there by one elementwise op instead of being stored."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: Callable) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            gate = gate.detach().requires_grad_()
            activated = ctx.act(gate)
        (grad_gate,) = torch.autograd.grad(activated, gate, grad * up)
        return grad_gate, grad * activated.detach(), None


class OpenELMFeedForwardNetwork(nn.Module):
    """Per-layer-width FFN; with GLU, ``proj_1`` holds [gate | up] stacked along its output dimension."""

    def __init__(self, config: OpenELMConfig, layer_idx: int):
        super().__init__()
        hidden = config.ffn_dim(layer_idx)
        self.ffn_with_glu = config.ffn_with_glu
        self.proj_1 = nn.Linear(config.model_dim, 2 * hidden if config.ffn_with_glu else hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, config.model_dim, bias=False)
        self.act = ACT2FN[config.activation_fn_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn_with_glu:
            gate, up = self.proj_1(x).chunk(2, dim=-1)  # each [b, s, hidden]
            gated = _GatedActivation.apply(gate, up, self.act) if torch.is_grad_enabled() else self.act(gate) * up
            return self.proj_2(gated)
        return self.proj_2(self.act(self.proj_1(x)))


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Plain matmul-softmax attention with key/value heads repeated, the way Apple's code does it.

    Used when ``attn_implementation="eager"`` (e.g. the tutorial-equivalent benchmark path); transformers' SDPA
    and flash paths are used otherwise.  Returns ``[b, s, h, d]`` like the other attention interfaces.
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # [b, h, t, d]
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [b, h, s, t]
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


#: How :func:`packed_sdpa_attention` attends a packed row: None picks per call (see :func:`packed_sdpa_path`);
#: "loop", "varlen" or "mask" forces a path (tests use it to run the mask path on the CPU).
PACKED_SDPA_PATH: str | None = None


def packed_sdpa_path(query: torch.Tensor) -> str:
    """The CPU loops over documents; CUDA makes one varlen flash call for fp16/bf16 (``varlen_attn``, Ampere or newer)
    and otherwise one SDPA call under a block-diagonal causal mask; other devices take the mask too."""
    if PACKED_SDPA_PATH is not None:
        return PACKED_SDPA_PATH
    if query.device.type == "cpu":
        return "loop"
    if (varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256
            and torch.cuda.get_device_capability(query.device)[0] >= 8):
        return "varlen"
    return "mask"


#: Forces :func:`cpu_attention_in_fp32`'s answer (tests use it); None measures.
CPU_ATTENTION_IN_FP32: bool | None = None
#: How much faster 16-bit attention must measure than fp32 to be used (see :func:`cpu_attention_in_fp32`).
NATIVE_MARGIN = 0.05


def cpu_attention_in_fp32(dtype: torch.dtype, query_heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether packed attention on this CPU should attend 16-bit inputs in fp32 (cast up, attend, cast back).

    Measured once per machine and shape (:func:`elmtune.hardware.measured`, cached): causal SDPA forward and
    backward over two 192-token documents, in ``dtype`` and in fp32 with the casts; ``dtype`` is used only where it
    measured more than :data:`NATIVE_MARGIN` faster (fp32 rounds less, so near-ties go to it, and so does a
    machine where probing is off, ``ELMTUNE_PROBE=0``).
    """
    if CPU_ATTENTION_IN_FP32 is not None:  # read on every call: only the measurement is remembered
        return CPU_ATTENTION_IN_FP32
    return _measured_attention_in_fp32(dtype, query_heads, kv_heads, head_dim)


def settle_cpu_attention(config: OpenELMConfig, dtype: torch.dtype, device: torch.device) -> None:
    """Take :func:`cpu_attention_in_fp32`'s decision now, for every layer shape of ``config``, rather than lazily
    inside a forward: under torchrun the probe is a collective (rank 0 measures, :func:`elmtune.hardware.measured`),
    and whether a forward needs it depends on its batch (packed rows or not), so not every rank would get there."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        for query_heads, kv_heads in sorted(set(zip(config.num_query_heads, config.num_kv_heads))):
            cpu_attention_in_fp32(dtype, query_heads, kv_heads, config.head_dim)


@functools.lru_cache(maxsize=None)
def _measured_attention_in_fp32(dtype: torch.dtype, query_heads: int, kv_heads: int, head_dim: int) -> bool:
    from ..hardware import best_times, measured

    def measure() -> dict:
        generator = torch.Generator().manual_seed(0)
        shapes = ((1, query_heads, 384, head_dim), (1, kv_heads, 384, head_dim), (1, kv_heads, 384, head_dim))
        inputs = [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]

        def attend(upcast: bool):
            def run():
                with torch.autocast("cpu", enabled=False):
                    outs = [F.scaled_dot_product_attention(*((x.float() if upcast else x) for x in qkv), is_causal=True,
                                                           enable_gqa=True)
                            for qkv in zip(*(x.split(192, 2) for x in inputs))]
                    torch.cat(outs, 2).to(dtype).sum().backward()
            return run

        times = best_times({"fp32": attend(True), "native": attend(False)}, repeats=2)
        return {"fp32_s": round(times["fp32"], 5), f"{dtype}_s".replace("torch.", ""): round(times["native"], 5),
                "fp32": times["native"] >= (1 - NATIVE_MARGIN) * times["fp32"]}

    inputs = {"dtype": str(dtype), "query_heads": query_heads, "kv_heads": kv_heads, "head_dim": head_dim}
    result = measured("cpu-attention-precision", inputs, measure)
    return True if result is None else bool(result["fp32"])


def packed_sdpa_attention(module: nn.Module | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          document_bounds: list[int], scaling: float, cu_seq_lens: torch.Tensor | None = None):
    """Causal attention inside each document of one packed row: ``[1, h, t, d]`` → ``[1, t, h, d]``.

    ``document_bounds`` are the documents' start offsets plus the row's end; ``cu_seq_lens`` the same as an int32
    tensor on the device (built here if not given).  No attention crosses documents.  Three paths, all with native
    GQA (:func:`packed_sdpa_path` picks one):

    * "loop": one small causal SDPA call per document on ``split`` views (their backward is one ``cat``, not a
      zero-filled full-size gradient per slice); no ``t × t`` mask.  On CPU, 16-bit inputs are attended in fp32
      (the output cast back) where that is measured faster on this machine (:func:`cpu_attention_in_fp32`): on
      an AVX-512 CPU without AMX PyTorch's CPU flash-attention backward ran ~3× faster in fp32 than in bf16, and
      on an AVX2-only CPU ~2.6×; CPUs with AMX-BF16 have fast bf16 kernels.
    * "varlen": one ``torch.nn.attention.varlen.varlen_attn`` (flash) call over the ``[t, h, d]`` tokens.
    * "mask": one SDPA call under a ``[t, t]`` boolean mask, causal within a document and closed across them.
    """
    path, dtype = packed_sdpa_path(query), query.dtype
    sizes = [b - a for a, b in zip(document_bounds[:-1], document_bounds[1:])]
    if path != "loop" and cu_seq_lens is None:
        cu_seq_lens = torch.tensor(document_bounds, dtype=torch.int32, device=query.device)
    if path == "varlen":
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [t, h, d]
        # window (-1, 0) is varlen_attn's causal mode
        return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max(sizes), max(sizes), scale=scaling,
                           window_size=(-1, 0), enable_gqa=True)[None]
    upcast = (query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
              and cpu_attention_in_fp32(dtype, query.shape[1], key.shape[1], query.shape[-1]))
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    # CPU autocast lists SDPA among the ops it runs in bf16: it would cast the fp32 inputs straight back.
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        if path == "mask":
            tokens = torch.arange(query.shape[2], dtype=cu_seq_lens.dtype, device=query.device)
            document = torch.searchsorted(cu_seq_lens[1:], tokens, right=True)  # [t]: each token's document
            mask = (document[:, None] == document[None, :]).tril_()  # [t, t]: same document, not in the future
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        else:
            out = torch.cat([F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
                             for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))],
                            dim=2)
    return out.transpose(1, 2).to(dtype)


class OpenELMMultiHeadCausalAttention(nn.Module):
    """Grouped-query attention with a fused qkv projection and optional per-head q/k RMSNorm."""

    def __init__(self, config: OpenELMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_q_heads = config.num_query_heads[layer_idx]
        self.num_kv_heads = config.num_kv_heads[layer_idx]
        # Read by transformers' attention interfaces (SDPA uses native GQA, no key/value copies).
        self.num_key_value_groups = self.num_q_heads // self.num_kv_heads
        self.is_causal = True
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.model_dim, (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        if config.normalize_qk_projections:
            self.q_norm = OpenELMRMSNorm(self.head_dim)
            self.k_norm = OpenELMRMSNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.out_proj = nn.Linear(self.num_q_heads * self.head_dim, config.model_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None = None, **kwargs) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)  # [b, hq+2hkv, s, d]
        query, key, value = qkv.split([self.num_q_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # [b, hkv, t, d]
        bounds = kwargs.pop("document_bounds", None)
        if bounds is not None:  # a packed row under SDPA
            out = packed_sdpa_attention(self, query, key, value, bounds, self.scaling, kwargs.get("cu_seq_lens_q"))
        else:
            attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
            out, _ = attention(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.out_proj(out.reshape(b, s, -1))  # out: [b, s, hq, d]


def takes_varlen_kwargs(implementation: str | None) -> bool:
    """Whether ``implementation`` is flash-style: transformers builds it no mask (its registered mask function is
    ``flash_attention_mask``) and it reads a packed row's documents from the varlen kwargs instead."""
    return ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) is flash_attention_mask


def document_bounds(position_ids: torch.Tensor, batch_size: int) -> list[int] | None:
    """Start offsets of the documents packed in the rows read as one flattened row (plus its end), or None when no
    row holds more than one: a document starts each row and wherever the position does not continue the previous
    one (as transformers detects it).  ``position_ids [b or 1, s]``."""
    restarts = F.pad(torch.diff(position_ids, dim=-1) != 1, (1, 0), value=True)  # [b or 1, s]
    starts = restarts.expand(batch_size, -1).flatten().nonzero().flatten()
    if starts.numel() == batch_size:
        return None
    return [*starts.tolist(), batch_size * position_ids.shape[-1]]


class OpenELMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: OpenELMConfig, layer_idx: int):
        super().__init__()
        self.attn = OpenELMMultiHeadCausalAttention(config, layer_idx)
        self.ffn = OpenELMFeedForwardNetwork(config, layer_idx)
        self.attn_norm = OpenELMRMSNorm(config.model_dim)
        self.ffn_norm = OpenELMRMSNorm(config.model_dim)

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache: Cache | None = None, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.attn_norm(hidden_states), rotary, attention_mask, cache, **kwargs)
        return hidden_states + self.ffn(self.ffn_norm(hidden_states))


class OpenELMPreTrainedModel(PreTrainedModel):
    config_class = OpenELMConfig
    config: OpenELMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OpenELMDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the padding/packing checks below are data-dependent


class OpenELMModel(OpenELMPreTrainedModel):
    def __init__(self, config: OpenELMConfig):
        super().__init__(config)
        self.token_embeddings = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = nn.ModuleList(OpenELMDecoderLayer(config, i) for i in range(config.num_transformer_layers))
        self.norm = OpenELMRMSNorm(config.model_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.token_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.token_embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                past_key_values: Cache | None = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and not (self.gradient_checkpointing and self.training) and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        given = input_ids if input_ids is not None else inputs_embeds
        seq_len = given.shape[1]

        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # Left padding: real tokens count from 0 whatever the padding in front of them.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past, past + seq_len, device=given.device)[None]
        if seq_len == 1 and isinstance(cache, PreallocatedCache) and not torch.is_grad_enabled():
            # a decode step of a model prepared for CPU decoding: the whole stack in one C call (decode.stack_step)
            stepped = stack_step(self, input_ids, inputs_embeds, position_ids, attention_mask, cache)
            if stepped is not None:
                return BaseModelOutputWithPast(last_hidden_state=stepped, cache=cache)
        if inputs_embeds is None:
            inputs_embeds = self.token_embeddings(input_ids)  # [b, s, D]
        rotary = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_freq_constant)
        # transformers looks for packed documents (position ids restarting inside a row) only without a cache
        # and without a 2D mask.  An empty dynamic cache sizes the mask exactly like no cache, and an all-ones mask
        # masks nothing (dropping it also lets SDPA run its causal kernel), so neither is handed over.
        mask_cache = None if past == 0 and isinstance(cache, DynamicCache) else cache
        if mask_cache is None and attention_mask is not None and attention_mask.ndim == 2 and bool(attention_mask.all()):
            attention_mask = None
        implementation = self.config._attn_implementation
        bounds = None
        if mask_cache is None and attention_mask is None:
            bounds = document_bounds(position_ids, inputs_embeds.shape[0])
        own_sdpa = implementation == "sdpa" and inputs_embeds.shape[0] == 1
        if bounds is not None and (own_sdpa or takes_varlen_kwargs(implementation)):
            # Packed rows: the documents' bounds, found once here, reach every layer's attention call as transformers'
            # varlen kwargs (cumulative lengths over the flattened rows, int32 on the device), which flash kernels
            # read; under SDPA, packed_sdpa_attention splits its one row on them.  No mask is needed.
            cu = torch.tensor(bounds, dtype=torch.int32, device=inputs_embeds.device)
            longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
            kwargs.update(position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                          max_length_k=longest)
            if own_sdpa:
                kwargs["document_bounds"] = bounds
            mask = None
        else:
            # For packed rows, transformers builds a per-document mask (sdpa/eager: 4D, flex: BlockMask) from the
            # restarting position ids; an implementation that gets no mask would mix the documents.
            mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      cache=mask_cache, position_ids=position_ids)
            if bounds is not None and mask is None:
                raise ValueError(
                    f"attention implementation {implementation!r} cannot keep the documents of a packed row apart: it "
                    "takes no per-document mask and no varlen boundaries, so they would attend to each other. Train "
                    "with --no-packing (packing=False), or choose attn_implementation sdpa, eager or flash_attention_2.")

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary, attention_mask=mask, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of ``hidden @ weight.T`` against ``targets``, one chunk of rows at a time.

    The forward pass also computes the gradients (softmax − one-hot, projected back through ``weight``), so no
    ``[rows, vocab]`` logits are kept for backward and none are recomputed: only ``grad_hidden [rows, D]`` (and
    ``grad_weight`` if the head is trained) is stored.  Logits are computed in ``weight``'s dtype and the softmax
    and loss in fp32, as the tutorial's path does; every chunk reuses the same two ``[chunk, vocab]`` buffers and
    works in place (fresh tensors of that size cost page faults on every chunk on CPU).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        rows = min(chunk_size, hidden.shape[0])
        logits = torch.empty((rows, weight.shape[0]), dtype=weight.dtype, device=hidden.device)
        probs = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size].to(weight.dtype), targets[start:start + chunk_size]
            n = h.shape[0]
            low, p = logits[:n], probs[:n]
            torch.mm(h, weight.t(), out=low)
            p.copy_(low)  # fp32 logits [n, vocab]
            target_logit = p.gather(1, t[:, None])
            top = p.amax(-1, keepdim=True)
            sums = p.sub_(top).exp_().sum(-1, keepdim=True)
            total += (top + sums.log() - target_logit).sum()  # cross-entropy = logsumexp - target logit
            p.div_(sums)  # softmax
            p[torch.arange(n, device=t.device), t] -= 1.0  # softmax - one-hot = d loss / d logits
            low.copy_(p)
            grad_hidden[start:start + n] = low @ weight
            if grad_weight is not None:
                grad_weight += p.T @ h.float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype)
        weight_grad = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight.numel() else None
        return grad_hidden * scale, weight_grad, None, None


def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits ``hidden @ weight.T``; a 16-bit head under fp32 arithmetic (:func:`weights16.prepare`, decoding on
    a CPU) goes through :func:`weights16.linear`."""
    return F.linear(hidden, weight) if weight.dtype == hidden.dtype else weights16.linear(hidden, weight)


def supervised_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    num_items_in_batch: torch.Tensor | int | None = None, chunk_size: int = 256) -> torch.Tensor:
    """Causal-LM loss computed only where a label is supervised, in chunks, in fp32.

    Equal to the usual shift-and-cross-entropy over full logits, but logits exist only for ``chunk_size``
    supervised positions at a time and never for prompt or padding positions (:class:`_LinearCrossEntropy`).
    ``hidden_states [b, s, D]``, ``labels [b, s]`` with -100 where unsupervised.
    """
    targets = labels[:, 1:]
    selected = targets != -100
    hidden, wanted = hidden_states[:, :-1][selected], targets[selected]  # [n, D], [n]
    if torch.is_grad_enabled():
        total = _LinearCrossEntropy.apply(hidden, weight, wanted, chunk_size)
    else:  # evaluation: the same chunked fp32 loss, without computing gradients nobody will use
        total = sum(F.cross_entropy(head(hidden[i:i + chunk_size], weight).float(), wanted[i:i + chunk_size],
                                    reduction="sum") for i in range(0, hidden.shape[0], chunk_size))
        total = torch.as_tensor(total, dtype=torch.float32, device=hidden.device)
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(selected.sum()), 1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


class OpenELMForCausalLM(OpenELMPreTrainedModel, GenerationMixin):
    #: When True, a forward pass with ``labels`` computes the loss from supervised positions only
    #: (:func:`supervised_loss`) and returns no logits.  elmtune's trainer turns it on; off, the model behaves
    #: like any transformers causal LM (full logits, then the loss).
    supervised_logits_only: bool = False

    def __init__(self, config: OpenELMConfig):
        super().__init__(config)
        self.transformer = OpenELMModel(config)
        # Apple's tied checkpoints have no head at all: logits use the embedding weight directly (see forward).
        self.lm_head = None if config.share_input_output_layers else nn.Linear(config.model_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.token_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.transformer.token_embeddings = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def output_weight(self) -> torch.Tensor:
        """The ``[vocab, D]`` matrix of the output head.

        With shared layers this is ``token_embeddings.weight``.  Under PEFT, a LoRA-wrapped embedding's ``.weight``
        is its *base* weight, so — exactly as in Apple's ``F.linear(h, token_embeddings.weight)`` — the adapter
        changes the input embedding but not the head.  Adapters therefore move between the two implementations.
        """
        return self.transformer.token_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                past_key_values: Cache | None = None, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache if cache is not None else past_key_values,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if labels is not None and self.supervised_logits_only:
            loss = supervised_loss(outputs.last_hidden_state, self.output_weight(), labels,
                                   kwargs.get("num_items_in_batch"))
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = head(hidden_states, self.output_weight())  # [b, s, vocab]
        loss = None
        if labels is not None:
            # transformers' causal-LM loss: shifts labels, ignores -100, upcasts logits to fp32, and honours
            # `num_items_in_batch` so gradient accumulation averages over the whole global batch.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
