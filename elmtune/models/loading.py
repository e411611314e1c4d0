"""Resolve what users type for ``--model``: a preset name, a local checkpoint directory (Apple's layout) or a
hub id; build the model for real, or on the meta device for planning."""

from __future__ import annotations

from pathlib import Path

import torch

from ..hub import local_dir
from .configuration_openelm import PRESETS, OpenELMConfig
from .openelm import OpenELMForCausalLM

WEIGHT_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer*", "special_tokens_map.json"]


class ModelSpecError(ValueError):
    """``--model`` names something we cannot load; the message says what to do instead."""


def model_dir(spec: str, config_only: bool = False) -> Path:
    """The local checkpoint directory for a path or hub id (downloading only config.json when that suffices)."""
    directory = local_dir(spec, "model", allow_patterns=["config.json"] if config_only else WEIGHT_FILES)
    if not (directory / "config.json").is_file():
        raise ModelSpecError(f"{directory}: no config.json here; expected an OpenELM checkpoint directory")
    return directory


def load_config(spec: str) -> OpenELMConfig:
    """The configuration for ``spec``: a preset name (see :data:`PRESETS`), a directory or a hub id."""
    if spec in PRESETS:
        return OpenELMConfig.from_preset(spec)
    if not spec:
        raise ModelSpecError(f"no model given; pass a checkpoint directory, a hub id or a preset ({', '.join(PRESETS)})")
    if not Path(spec).expanduser().exists() and "/" not in spec:
        raise ModelSpecError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory")
    config = OpenELMConfig.from_pretrained(model_dir(spec, config_only=True))
    if config.model_type != "openelm":
        raise ModelSpecError(f"{spec}: model_type is {config.model_type!r}; elmtune trains OpenELM models")
    return config


def build_on_meta(config: OpenELMConfig) -> OpenELMForCausalLM:
    """The model's full structure with no storage behind it, for counting and planning."""
    with torch.device("meta"):
        return OpenELMForCausalLM(config)


def load_model(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: str | torch.device | None = None,
               **from_pretrained_kwargs) -> OpenELMForCausalLM:
    """Weights from a checkpoint directory or hub id, or a seeded random init for a preset.

    With ``device``, the weights are created (preset) or read (checkpoint) straight onto it, in ``dtype``: a 3B
    model never passes through host memory in fp32 on its way to the GPU.  The random init of a preset draws
    from the CPU's generator either way, so a seed gives the same weights on every device.
    """
    if spec in PRESETS:
        torch.manual_seed(seed)
        attn = from_pretrained_kwargs.get("attn_implementation")
        config = OpenELMConfig.from_preset(spec, **({"attn_implementation": attn} if attn else {}))
        model = OpenELMForCausalLM._from_config(config, dtype=dtype)  # built in `dtype`: no fp32 copy on the way
        return model.to(device) if device is not None else model
    load_config(spec)  # the clear errors for a wrong spec, before anything heavy
    if device is not None and "device_map" not in from_pretrained_kwargs:
        from_pretrained_kwargs["device_map"] = {"": torch.device(device)}
    return OpenELMForCausalLM.from_pretrained(model_dir(spec), dtype=dtype, **from_pretrained_kwargs)
