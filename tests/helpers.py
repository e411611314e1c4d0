"""Test helpers: the read-only ``../shared`` folder beside the checkout, and tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import elmtune  # noqa: F401  (registers the OpenELM Auto classes)
from elmtune import OpenELMConfig, OpenELMForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; the test is skipped, saying what is missing, when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the read-only shared/ folder beside the checkout); not found")
    return path


def tiny_config(**overrides) -> OpenELMConfig:
    """A 2-layer OpenELM with Apple's recipe (GQA, q/k norms, GLU, per-layer widths), small enough for CPU tests."""
    fields = dict(vocab_size=96, model_dim=64, head_dim=16, num_transformer_layers=2, num_gqa_groups=2,
                  qkv_multipliers=[0.5, 1.0], ffn_multipliers=[0.5, 4.0], ffn_dim_divisor=32,
                  normalize_qk_projections=True, share_input_output_layers=True, rope_max_length=4096)
    return OpenELMConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> OpenELMForCausalLM:
    torch.manual_seed(seed)
    model = OpenELMForCausalLM(tiny_config(**overrides))
    # transformers' default init (std 0.02) gives near-uniform logits; widen it so argmax decisions are sharp
    # and comparisons between code paths are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
    return model.eval()
