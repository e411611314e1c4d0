"""Apple-layout checkpoints: save → load round trips (single file and sharded) with strict key checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from elmtune import OpenELMForCausalLM
from tests.helpers import tiny_model


def apple_keys(num_layers: int, tied: bool) -> set[str]:
    """The tensor names in Apple's OpenELM checkpoints, written out independently of our module tree."""
    keys = {"transformer.token_embeddings.weight", "transformer.norm.weight"}
    for i in range(num_layers):
        p = f"transformer.layers.{i}."
        keys |= {p + k for k in ("attn.qkv_proj.weight", "attn.q_norm.weight", "attn.k_norm.weight",
                                 "attn.out_proj.weight", "ffn.proj_1.weight", "ffn.proj_2.weight",
                                 "attn_norm.weight", "ffn_norm.weight")}
    return keys if tied else keys | {"lm_head.weight"}


def saved_keys(directory) -> set[str]:
    index = directory / "model.safetensors.index.json"
    files = sorted({*json.loads(index.read_text())["weight_map"].values()}) if index.exists() else ["model.safetensors"]
    keys: set[str] = set()
    for name in files:
        with safe_open(directory / name, "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard", [None, "100KB"])
def test_save_load_round_trip(tmp_path, tied, shard):
    model = tiny_model(share_input_output_layers=tied)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    if shard:
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert saved_keys(tmp_path) == apple_keys(2, tied)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "openelm" and config["share_input_output_layers"] is tied
    assert config["num_query_heads"] == model.config.num_query_heads

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, OpenELMForCausalLM)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 4, 9, 16, 25]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_golden_checkpoint_round_trips_with_apples_keys(tmp_path, golden_dir):
    model = AutoModelForCausalLM.from_pretrained(golden_dir)
    model.save_pretrained(tmp_path, max_shard_size="20MB")
    assert saved_keys(tmp_path) == saved_keys(golden_dir) == apple_keys(4, tied=True)
    original = json.loads((golden_dir / "config.json").read_text())
    written = json.loads((tmp_path / "config.json").read_text())
    for key in ("model_dim", "head_dim", "num_query_heads", "num_kv_heads", "ffn_multipliers", "qkv_multipliers",
                "ffn_dim_divisor", "num_gqa_groups", "normalize_qk_projections", "share_input_output_layers",
                "rope_freq_constant", "rope_max_length", "max_context_length", "activation_fn_name", "vocab_size"):
        assert written[key] == original[key], key


def test_loading_builds_on_meta_so_weights_are_not_initialised_twice(tmp_path, monkeypatch):
    """from_pretrained must construct the model on the meta device and fill in the checkpoint, not allocate and
    randomly initialise weights that are then overwritten."""
    tiny_model().save_pretrained(tmp_path)
    devices = []
    original_init = OpenELMForCausalLM.__init__

    def spy(self, config):
        original_init(self, config)
        devices.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(OpenELMForCausalLM, "__init__", spy)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert devices == [{"meta"}]
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
