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

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

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
