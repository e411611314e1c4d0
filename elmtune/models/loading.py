"""Resolve what users type for ``--model``: a preset name, a local checkpoint directory (Apple's layout)."""

from __future__ import annotations

from pathlib import Path

import torch

from .configuration_openelm import PRESETS, OpenELMConfig
from .openelm import OpenELMForCausalLM


class ModelSpecError(ValueError):
    """``--model`` names something we cannot load; the message says what to do instead."""


def load_config(spec: str) -> OpenELMConfig:
    """The configuration for ``spec``: a preset name (see :data:`PRESETS`) or a directory with ``config.json``."""
    if spec in PRESETS:
        return OpenELMConfig.from_preset(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path}: no config.json here; expected an OpenELM checkpoint directory")
        return OpenELMConfig.from_pretrained(path)
    raise ModelSpecError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory")


def build_on_meta(config: OpenELMConfig) -> OpenELMForCausalLM:
    """The model's full structure with no storage behind it, for counting and planning."""
    with torch.device("meta"):
        return OpenELMForCausalLM(config)
