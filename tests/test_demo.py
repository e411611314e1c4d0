"""``elmtune demo``, the embedded default: offline, a few minutes on a CPU, and it must really learn."""

from __future__ import annotations

import json

from elmtune.cli import main


def test_demo_meets_its_bar(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_heldout"] == 200
    assert summary["adapter_exact_match"] >= 0.9, summary
    assert summary["base_exact_match"] <= 0.05, summary  # the random base: chance
    assert summary["seconds"] <= 180, summary
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "loss.png").is_file()
    assert str(out.resolve()) in capsys.readouterr().out

    # `elmtune eval` on the demo's held-out set reports the adapter's gain over the base
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", str(out / "heldout.jsonl"),
                 "--output-dir", str(tmp_path / "eval"), "--limit", "40", "--max-new-tokens", "12"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    base, tuned = report["base"], report["adapter_model"]
    assert tuned["exact_match"] >= 0.9 > 0.05 >= base["exact_match"]
    assert tuned["loss"] < base["loss"] and tuned["rouge_l"] > base["rouge_l"]
    assert "| exact match | 0.0% |" in (tmp_path / "eval" / "eval.md").read_text()
