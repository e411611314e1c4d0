"""``elmtune merge``: merged == base + adapter, in Apple's layout, loadable by stock transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from elmtune.inference import load_pipeline
from elmtune.merge import MergeError, merge
from tests.helpers import train_tiny_adapter

IDS = torch.tensor([[1, 5, 9, 17, 33, 40, 3], [1, 7, 8, 9, 10, 11, 12]])


@pytest.mark.parametrize("targets", [None, ["qkv_proj", "out_proj", "proj_1", "proj_2"]], ids=["tutorial", "no-emb"])
def test_merged_logits_equal_base_plus_adapter(tmp_path, targets):
    overrides = {"lora_targets": targets} if targets else {}
    base, adapter = train_tiny_adapter(tmp_path, **overrides)
    result = merge(str(adapter), str(tmp_path / "merged"), max_shard_size="50KB")
    merged_dir = tmp_path / "merged"
    assert result["untied_head"] is (targets is None)  # only an adapted embedding needs the untied head

    config = json.loads((merged_dir / "config.json").read_text())
    assert config["share_input_output_layers"] is (targets is not None)
    assert config["torch_dtype"] == "float32" and "dtype" not in config and config["model_type"] == "openelm"
    assert (merged_dir / "model.safetensors.index.json").is_file() and (merged_dir / "tokenizer.model").is_file()

    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        expected = load_pipeline(adapter=str(adapter), dtype="fp32").model(IDS).logits
        got = merged.eval()(IDS).logits
    assert (got - expected).abs().max() <= 1e-4
    if targets is None:  # the adapted head really differs from the base head: the untie matters
        assert not torch.equal(merged.lm_head.weight, merged.transformer.token_embeddings.weight)


def test_merge_refuses_a_non_empty_output_dir(tmp_path):
    _, adapter = train_tiny_adapter(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty"):
        merge(str(adapter), str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
