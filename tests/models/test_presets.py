"""Apple's published shapes, counted on the meta device (no weights allocated)."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from peft import LoraConfig, get_peft_model

from elmtune import PRESETS, OpenELMConfig, OpenELMForCausalLM

TUTORIAL_LORA = dict(r=32, lora_alpha=32, lora_dropout=0.1,
                     target_modules=["token_embeddings", "qkv_proj", "out_proj", "proj_1", "proj_2"])


def meta_model(name: str) -> OpenELMForCausalLM:
    with torch.device("meta"):
        return OpenELMForCausalLM(OpenELMConfig.from_preset(name))


def test_presets_are_apples_shapes():
    assert set(PRESETS) == {"openelm-270m", "openelm-450m", "openelm-1.1b", "openelm-3b"}
    config = OpenELMConfig.from_preset("openelm-270m")
    # Apple's published OpenELM-270M config.json lists these per-layer head counts.
    assert config.num_query_heads == [12] * 5 + [16] * 7 + [20] * 4
    assert config.num_kv_heads == [3] * 5 + [4] * 7 + [5] * 4
    assert config.ffn_multipliers[:4] == [0.5, 0.73, 0.97, 1.2] and config.ffn_multipliers[-1] == 4.0


@pytest.mark.parametrize("name, expected", [("openelm-270m", 271_527_168), ("openelm-450m", 457_179_136),
                                            ("openelm-1.1b", 1_079_891_456), ("openelm-3b", 3_036_647_424)])
def test_parameter_counts_on_meta(name, expected):
    model = meta_model(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected


def test_tutorial_lora_on_3b_has_45_883_392_trainable_parameters():
    peft_model = get_peft_model(meta_model("openelm-3b"), LoraConfig(**TUTORIAL_LORA))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == 45_883_392
    assert total == 3_036_647_424 + 45_883_392
    assert all(p.device.type == "meta" for p in peft_model.parameters())


def test_bad_configs_are_refused_with_a_reason():
    # transformers' strict config validation wraps our ValueError; the message is ours.
    with pytest.raises(StrictDataclassError, match="`num_query_heads` has 1 entries"):
        OpenELMConfig(num_transformer_layers=2, num_query_heads=[4], num_kv_heads=[1, 1])
    with pytest.raises(StrictDataclassError, match="not a multiple"):
        OpenELMConfig(num_transformer_layers=1, num_query_heads=[6], num_kv_heads=[4], ffn_multipliers=1.0)
    with pytest.raises(ValueError, match="unknown OpenELM preset"):
        OpenELMConfig.from_preset("openelm-7b")
