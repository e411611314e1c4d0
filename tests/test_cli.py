"""The command line front door."""

from __future__ import annotations

import subprocess
import sys

from elmtune.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "info" in capsys.readouterr().out


def test_info_counts_a_preset_without_weights(capsys):
    assert main(["info", "openelm-3b"]) == 0
    out = capsys.readouterr().out
    assert "3,036,647,424" in out and "query_heads: [12, 12, 12, 12, 16" in out


def test_bad_model_is_a_one_line_error_with_exit_2(capsys, tmp_path):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err and str(tmp_path) in err


def test_golden_checkpoint_loads_with_stock_auto_class_in_a_fresh_interpreter(golden_dir):
    code = ("import elmtune, transformers; "
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(golden_dir)!r}); "
            "print(type(m).__module__, type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "elmtune.models.openelm OpenELMForCausalLM"
