"""OpenELM configuration: the fields are exactly the keys of Apple's published ``config.json``.

Apple's checkpoints store the *recipe* for the per-layer widths (``qkv_multipliers``, ``ffn_multipliers``,
``num_gqa_groups``) and, in the published files, the expanded per-layer head counts too.  We read both: an
explicit ``num_query_heads`` / ``num_kv_heads`` list wins, otherwise the lists are derived the way Apple's
reference configuration derives them, so a config written by hand from the paper's recipe also works.
"""

from __future__ import annotations

import numbers

import numpy as np
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below 90% of ``value``.

    This is the rounding OpenELM uses for every per-layer width (query dims and FFN widths), so the shapes of
    Apple's weights follow from the multipliers only if we round exactly the same way.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def _per_layer(multipliers: float | list[float], num_layers: int, what: str) -> list[float]:
    """A scalar applies to every layer; a pair is layer-wise scaling (linear from first to last layer, rounded
    to two decimals as Apple does); a list of ``num_layers`` values is taken as is."""
    if isinstance(multipliers, numbers.Number):
        return [float(multipliers)] * num_layers
    values = [float(v) for v in multipliers]
    if len(values) == num_layers:
        return values
    if len(values) == 2:
        return [round(float(v), 2) for v in np.linspace(values[0], values[1], num=num_layers)]
    raise ValueError(f"OpenELM config: `{what}` must be a number, a [first, last] pair or one value per layer "
                     f"({num_layers}); got {len(values)} values")


@strict
class OpenELMConfig(PreTrainedConfig):
    r"""Configuration of an OpenELM decoder (Apple, 2024), read from and written to Apple's ``config.json`` keys.

    Keys transformers adds (``use_cache``, ``torch_dtype``, ``architectures``, Apple's ``auto_map`` …) are
    accepted and kept, so a round trip through :meth:`save_pretrained` preserves the file.
    """

    model_type = "openelm"
    # Generic names some transformers utilities (caches, PEFT, Trainer) ask for.
    attribute_map = {"hidden_size": "model_dim", "num_hidden_layers": "num_transformer_layers",
                     "max_position_embeddings": "max_context_length"}

    vocab_size: int = 32000
    max_context_length: int = 2048
    num_transformer_layers: int = 12
    model_dim: int = 2048
    head_dim: int = 128
    qkv_multipliers: float | int | list[float | int] = 1.0
    num_query_heads: list[int] | None = None
    num_kv_heads: list[int] | None = None
    num_gqa_groups: int = 1
    ffn_multipliers: float | int | list[float | int] = 4.0
    ffn_with_glu: bool = True
    ffn_dim_divisor: int = 256
    activation_fn_name: str = "swish"
    normalization_layer_name: str = "rms_norm"
    normalize_qk_projections: bool = False
    share_input_output_layers: bool = False
    rope_freq_constant: int | float = 10000
    rope_max_length: int = 4096
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        n = self.num_transformer_layers
        if self.num_query_heads is None:
            # Apple: query width = model_dim * multiplier, rounded to a multiple of head_dim * num_gqa_groups.
            divisor = self.head_dim * self.num_gqa_groups
            qkv = _per_layer(self.qkv_multipliers, n, "qkv_multipliers")
            self.num_query_heads = [make_divisible(self.model_dim * m, divisor) // self.head_dim for m in qkv]
        if self.num_kv_heads is None:
            self.num_kv_heads = [q // self.num_gqa_groups for q in self.num_query_heads]
        # Apple expands the FFN multipliers into one value per layer and saves them that way.
        self.ffn_multipliers = _per_layer(self.ffn_multipliers, n, "ffn_multipliers")
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Called by transformers' strict dataclass validation: reject shapes no OpenELM can have."""
        n = self.num_transformer_layers
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"OpenELM config: `{key}` has {len(getattr(self, key))} entries but "
                                 f"num_transformer_layers is {n}")
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if kv <= 0 or q % kv:
                raise ValueError(f"OpenELM config: layer {i} has {q} query heads, not a multiple of its {kv} "
                                 "key/value heads")
        if self.head_dim % 2:
            raise ValueError(f"OpenELM config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.normalization_layer_name != "rms_norm":
            raise ValueError("OpenELM config: only normalization_layer_name='rms_norm' is supported (all of "
                             f"Apple's checkpoints use it); got {self.normalization_layer_name!r}")

    def ffn_dim(self, layer_idx: int) -> int:
        """Hidden width of layer ``layer_idx``'s feed-forward network (before the GLU doubling)."""
        return make_divisible(self.ffn_multipliers[layer_idx] * self.model_dim, self.ffn_dim_divisor)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "OpenELMConfig":
        """One of :data:`PRESETS` (Apple's published shapes), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown OpenELM preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _apple(layers: int, dim: int, head_dim: int) -> dict:
    # Every published OpenELM shares this recipe; only depth, width and head size change.
    return dict(num_transformer_layers=layers, model_dim=dim, head_dim=head_dim, num_gqa_groups=4,
                qkv_multipliers=[0.5, 1.0], ffn_multipliers=[0.5, 4.0], ffn_dim_divisor=256, ffn_with_glu=True,
                activation_fn_name="swish", normalization_layer_name="rms_norm", normalize_qk_projections=True,
                share_input_output_layers=True, rope_freq_constant=10000, rope_max_length=4096,
                max_context_length=2048, vocab_size=32000, initializer_range=0.02, bos_token_id=1, eos_token_id=2)


#: Apple's published architectures (the -Instruct variants share them), for random init and meta-device planning.
PRESETS: dict[str, dict] = {
    "openelm-270m": _apple(16, 1280, 64),
    "openelm-450m": _apple(20, 1536, 64),
    "openelm-1.1b": _apple(28, 2048, 64),
    "openelm-3b": _apple(36, 3072, 128),
}
