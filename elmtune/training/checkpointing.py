"""Activation checkpointing: what a decoder layer keeps for backward, and what it recomputes.

``--gradient-checkpointing``:

* ``off`` — every layer keeps what its backward needs: fastest, most memory;
* ``on`` — *selective*: each layer is run again in backward, but the outputs of attention and of the three
  narrow frozen projections (``attn.qkv_proj``, ``attn.out_proj``, ``ffn.proj_2``) are kept from the forward pass
  (PyTorch's selective activation checkpointing), so the recomputation is ``ffn.proj_1`` — the widest output of a
  layer, ``[tokens, 2 × ffn_dim]`` — plus elementwise work.  Per token and layer that keeps the layer input,
  the qkv, out_proj and proj_2 outputs and the attention output (≈ 14 KB for the 270M model in bf16, the
  attention output being fp32 on CPU, by :func:`~elmtune.training.plan.estimate_memory`'s count) against
  ≈ 32 KB without checkpointing;
* ``full`` — only each layer's input is kept and the whole layer runs twice (the tutorial's checkpointing):
  least memory, one full forward pass more;
* ``auto`` — the first of off, on, full whose memory estimate fits (:func:`elmtune.training.plan.decide_checkpointing`).

The policy recognises a kept projection by the address of its frozen weight (the matmul's weight operand is a
transposed view of it), so LoRA's own small matmuls are recomputed.  Where weights are copied or replaced — a
4-bit base, FSDP sharding, the 16-bit autocast copies of a full fine-tune's fp32 weights — nothing would be
recognised, and ``full`` is used instead (:func:`selective_unsupported`).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers.modeling_layers import GradientCheckpointingLayer

MODES = ("off", "on", "full")
#: Frozen projections whose outputs ``on`` keeps (suffixes of module names, as in Apple's checkpoints).
KEPT_PROJECTIONS = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_2")

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default}
# Every fused attention kernel SDPA may dispatch to (those this build of PyTorch has).
_ATTENTION = {getattr(_aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(_aten, name)}


def kept_projections(model: nn.Module) -> list[nn.Linear]:
    """The frozen projections whose outputs selective checkpointing keeps."""
    return [module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.removesuffix(".base_layer").endswith(KEPT_PROJECTIONS)]


def selective_unsupported(quantize: str, distributed: str, world_size: int, method: str = "lora",
                          precision: str = "fp32") -> str | None:
    """Why selective checkpointing would keep nothing in this run (then ``full`` is used), or None.

    Under ``--method full`` the projections' weights are trainable fp32 master weights: in fp32 the matmul still
    multiplies by (a view of) the weight itself and the policy works; under 16-bit autocast it multiplies by a
    fresh 16-bit copy, at a new address every time, and nothing would be recognised.
    """
    if method == "full" and precision != "fp32":
        return (f"full fine-tuning in {precision} multiplies by autocast's {precision} copy of each fp32 weight, "
                "which the policy cannot recognise")
    if quantize != "none":
        return "a quantized base multiplies by a dequantized copy of each weight, which the policy cannot recognise"
    if distributed == "fsdp" and world_size > 1:
        return "FSDP replaces the weights it shards"
    return None


class SelectivePolicy:
    """``context_fn`` for :func:`torch.utils.checkpoint.checkpoint`: keep attention outputs and the outputs of
    matmuls with a kept projection's weight; recompute everything else."""

    def __init__(self, model: nn.Module):
        self.projections = kept_projections(model)
        if not self.projections:
            raise ValueError(f"no {', '.join(KEPT_PROJECTIONS)} found: selective checkpointing needs an OpenELM model")

    def __call__(self):
        # Read at every call from the modules (not kept tensors): the weights may have moved since.
        addresses = {module.weight.data_ptr() for module in self.projections}

        def policy(ctx, op, *args, **kwargs):
            if op in _ATTENTION or (op in _MATMULS and args[-1].data_ptr() in addresses):
                return CheckpointPolicy.MUST_SAVE
            return CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)


def enable_checkpointing(model: nn.Module, mode: str) -> None:
    """Turn activation checkpointing of ``model``'s decoder layers to ``mode`` (off, on or full)."""
    if mode not in MODES:
        raise ValueError(f"gradient checkpointing must be one of {', '.join(MODES)}, not {mode!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mode == "off":
        if base.is_activation_checkpointing:
            base.activation_checkpointing_disable()
        return
    kwargs = {"use_reentrant": False}
    if mode == "on":
        kwargs["context_fn"] = SelectivePolicy(base)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


#: How much faster (relative) a mode that recomputes more must measure to be preferred over one that keeps more.
MARGIN = 0.05


def probe_layer(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s middle decoder layer as it trains (LoRA, fused forward, dropout …), for :func:`measure_modes`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError("no decoder layer found to measure")
    return copy.deepcopy(layers[len(layers) // 2]).train()


def measure_modes(layer: nn.Module, lengths: list[int], dtype: torch.dtype, device: torch.device, config,
                  modes: tuple[str, ...] = MODES, repeats: int = 1) -> dict[str, float]:
    """Seconds for forward + backward of ``layer`` on one packed row of documents of ``lengths`` tokens, under
    each of ``modes`` (the fastest of ``repeats`` after a warm-up, the modes' runs interleaved), in ``dtype``
    under autocast as the Trainer runs it."""
    from ..hardware import best_times
    from ..models.openelm import rotary_cos_sin

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, sum(lengths), config.model_dim, generator=generator).to(device=device, dtype=dtype)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    rotary = rotary_cos_sin(positions, config.head_dim, config.rope_freq_constant)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    # What OpenELMModel hands every layer for a packed row under SDPA (see its forward)
    kwargs = dict(position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                  max_length_k=max(lengths), document_bounds=bounds)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(mode: str):
        def step():
            layer.gradient_checkpointing = mode != "off"
            if mode != "off":
                extra = {"context_fn": SelectivePolicy(layer)} if mode == "on" else {}
                layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False, **extra)
            x = hidden.detach().requires_grad_()
            with autocast:
                out = layer(x, rotary, attention_mask=None, cache=None, **dict(kwargs))
            out.float().sum().backward()
            layer.zero_grad(set_to_none=True)
        return step

    return best_times({mode: run(mode) for mode in modes}, repeats=repeats, device=device)


#: Tokens in the probe's packed row (documents of the run's median length): enough for the matmuls to dominate
#: as in training, small enough to take seconds (one layer, two modes, a warm-up and three timed runs each).
PROBE_TOKENS = 512


def measured_modes(model: nn.Module, median_length: int, dtype: torch.dtype, device: torch.device,
                   modes: tuple[str, ...] = ("on", "full")) -> dict | None:
    """:func:`measure_modes` on a copy of ``model``'s middle layer, cached per machine
    (:func:`elmtune.hardware.measured`): ``{mode: seconds}``, or None where probing is off."""
    from ..hardware import measured

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    step = 32  # documents' length rounded, so that runs on similar data share the measurement
    length = min(PROBE_TOKENS, max(step, round(median_length / step) * step))
    lengths = [length] * max(1, PROBE_TOKENS // length)
    layer = probe_layer(model)
    adapters = sorted({f"{type(m).__name__}:{dict(getattr(m, 'r', {}))}" for m in layer.modules() if hasattr(m, "lora_A")})
    inputs = {"shapes": sorted(tuple(p.shape) for p in layer.parameters()), "head_dim": config.head_dim,
              "trainable": sum(p.numel() for p in layer.parameters() if p.requires_grad), "adapters": adapters,
              "dtype": str(dtype), "lengths": lengths, "modes": list(modes)}

    def measure() -> dict:
        times = measure_modes(layer, lengths, dtype, device, config, modes, repeats=3)  # one run could be a slow spell
        return {mode: round(t, 5) for mode, t in times.items()}

    return measured("checkpointing-modes", inputs, measure, device)


def fastest_mode(times: dict[str, float], allowed: tuple[str, ...]) -> str:
    """Of ``allowed`` modes (ordered from most kept to least), the fastest by ``times``.

    Selective is kept only where it measured faster than ``full`` (it holds more memory than ``full``); otherwise a
    mode that recomputes more is taken only when it measured more than :data:`MARGIN` faster than the one before it
    (so noise never trades memory-kept speed away).
    """
    candidates = list(allowed)
    if "on" in candidates and "full" in candidates and times["on"] >= times["full"]:
        candidates.remove("on")
    best = candidates[0]
    for mode in candidates[1:]:
        if times[mode] < times[best] * (1 - MARGIN):
            best = mode
    return best


def checkpointing_mode(model: nn.Module) -> str:
    """The mode ``model``'s layers run in (as set by :func:`enable_checkpointing`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func")]
    if not layers:
        return "off"
    func = layers[0]._gradient_checkpointing_func
    context = func.keywords.get("context_fn") if isinstance(func, functools.partial) else None
    return "on" if isinstance(context, SelectivePolicy) else "full"


def settle_selective(model: nn.Module, median_length: int, dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """For a model set to ``on``: keep selective checkpointing where it measured faster than ``full`` on this
    machine (:func:`measured_modes`), else switch ``model`` to ``full``.  Returns the mode and what was measured."""
    times = measured_modes(model, median_length, dtype, device)
    if times is None:
        return "on", "selective, not measured (ELMTUNE_PROBE=0)"
    mode = fastest_mode(times, ("on", "full"))
    if mode == "full":
        enable_checkpointing(model, "full")
    measured = f"one layer measured here: selective {times['on']:.3g} s, full {times['full']:.3g} s"
    return mode, measured + ("" if mode == "on" else ": selective does not pay on this machine, full is used")
