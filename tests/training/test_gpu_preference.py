"""Preference tuning on a CUDA GPU (skipped, with the reason, where there is none; run by scripts/gpu-check.sh):
DPO in bf16 with selective checkpointing learns the rule the CPU test learns, and full DPO with its reference copy
trains there too."""

from __future__ import annotations

import json
import math

import pytest
import torch

from elmtune.training import train
from tests.helpers import save_tiny_base
from tests.training.test_preference import options, preferred_share, rule_pairs, write_jsonl

pytestmark = pytest.mark.gpu
pytest.importorskip("trl", reason="preference tuning needs TRL (pip install 'elmtune[preference]')")


def test_dpo_in_bf16_on_cuda_learns_the_rule(tmp_path):
    from elmtune.inference import load_pipeline

    base = save_tiny_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", rule_pairs(256, seed=0))
    held_out = rule_pairs(32, seed=1)
    out = tmp_path / "dpo"
    summary = train(options(base, data, out, val_file=write_jsonl(tmp_path / "val.jsonl", held_out), max_steps=64,
                            eval_steps=32, lr=1e-2, lora_r=16, lora_alpha=32, device="cuda", precision="bf16",
                            gradient_checkpointing="on"))
    assert summary["eval_reward_accuracy"] >= 0.9
    assert preferred_share(load_pipeline(adapter=str(out), dtype="fp32", device="cpu"), held_out) >= 0.9


def test_full_dpo_on_cuda_trains_with_a_reference_copy(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", rule_pairs(32, seed=0))
    out = tmp_path / "full"
    train(options(base, data, out, tune="full", max_steps=3, lr=1e-3, device="cuda", precision="bf16",
                  gradient_checkpointing="full"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "config.json").is_file() and json.loads((out / "elmtune.json").read_text())["method"] == "dpo"
