"""Parity with Apple's reference implementation, on a checkpoint and outputs made with Apple's own code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from elmtune import OpenELMForCausalLM
from tests.helpers import shared_path


@pytest.fixture(scope="module")
def golden():
    directory = shared_path("golden", "openelm", "tiny")
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    return directory, model.eval(), info, json.loads((directory / "golden.json").read_text())


def test_loads_natively_with_no_missing_or_unexpected_keys(golden):
    directory, model, info, _ = golden
    assert "auto_map" in json.loads((directory / "config.json").read_text())  # Apple's remote-code pointer is there
    assert not list(directory.glob("*.py"))  # ... but no remote code to run
    assert isinstance(model, OpenELMForCausalLM)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    with safe_open(directory / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 10_734_080


def test_config_reads_apples_keys(golden):
    directory, model, _, _ = golden
    config = AutoConfig.from_pretrained(directory)
    assert config.num_query_heads == [4, 8, 8, 8] and config.num_kv_heads == [1, 2, 2, 2]
    assert [config.ffn_dim(i) for i in range(4)] == [256, 512, 768, 1024]
    assert config.use_cache is True and config.share_input_output_layers is True
    assert model.lm_head is None


def test_logits_match_reference(golden):
    directory, model, _, data = golden
    reference = load_file(directory / "golden_logits.safetensors")
    for case in data["cases"]:
        with torch.no_grad():
            logits = model(torch.tensor([case["input_ids"]])).logits[0, case["logit_positions"]]
        diff = (logits - reference[case["name"]]).abs().max().item()
        assert diff <= 1e-4, f"{case['name']}: max |Δlogit| = {diff}"


def test_greedy_continuations_match_reference(golden):
    _, model, _, data = golden
    config = GenerationConfig(do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    for case in data["cases"]:
        ids = torch.tensor([case["input_ids"]])
        out = model.generate(ids, generation_config=config)
        assert out[0, ids.shape[1]:].tolist() == case["greedy_new_tokens"], case["name"]


def test_tutorial_first_batch_loss(golden):
    _, model, _, data = golden
    batch = {k: torch.tensor(v) for k, v in data["tutorial_first_batch"].items() if k != "loss"}
    with torch.no_grad():
        loss = model(**batch).loss
    assert loss.dtype == torch.float32
    assert abs(loss.item() - data["tutorial_first_batch"]["loss"]) <= 1e-5
