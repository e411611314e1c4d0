"""`elmtune bench generate` on a tiny checkpoint: it runs where it is told and measures something."""

from __future__ import annotations

import pytest

from elmtune.bench import BenchGenerateOptions, bench_generate, matmul_peak
from tests.helpers import save_tiny_base


def test_bench_generate_measures_on_the_chosen_device_and_dtype(tmp_path, capsys):
    base = save_tiny_base(tmp_path / "base")
    result = bench_generate(BenchGenerateOptions(model=str(base), new_tokens=4, prompt_tokens=4, dtype="fp32",
                                                 device="cpu"))
    assert set(result["best"]) == {"elmtune batch 1", "elmtune batch 8", "reference batch 1", "reference batch 8"}
    assert all(rate > 0 for rate in result["best"].values()) and result["dtype"] == "float32"
    out = capsys.readouterr().out
    assert "on cpu, fp32" in out and "batch 8 / batch 1" in out and "fast / reference" in out


def test_bench_generate_skips_llama_cpp_with_the_reason_when_it_is_not_installed(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    base = save_tiny_base(tmp_path / "base")
    result = bench_generate(BenchGenerateOptions(model=str(base), new_tokens=3, prompt_tokens=3, dtype="fp32",
                                                 device="cpu", gguf=str(tmp_path / "absent.gguf"), reference=False))
    assert "llama-cpp-python is not installed" in result["peer_skipped"]
    assert "llama.cpp: skipped — llama-cpp-python is not installed" in capsys.readouterr().out


def test_bench_generate_runs_llama_cpp_on_the_same_weights(tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'elmtune[llama]')")
    from elmtune.export_gguf import export_gguf

    base = save_tiny_base(tmp_path / "base")
    export_gguf(str(base), str(tmp_path / "m.gguf"), "f32")
    result = bench_generate(BenchGenerateOptions(model=str(base), new_tokens=8, prompt_tokens=5, dtype="fp32",
                                                 device="cpu", gguf=str(tmp_path / "m.gguf"), reference=False))
    assert result["peer_ratio"] > 0 and len(result["round_ratios"]) == 2
    assert result["agreement"] == 8  # f32 weights both sides: llama.cpp decodes the same greedy tokens
    assert "elmtune / llama.cpp at batch 1" in capsys.readouterr().out


def test_matmul_peak_is_a_positive_measurement_on_the_cpu():
    import torch

    assert matmul_peak(torch.float32, "cpu", repeats=1) > 1e6


def test_bench_train_reports_the_cpu_and_runs_every_path_in_one_precision(capsys, monkeypatch):
    """The figures come with the CPU they were measured on (model, bf16 instructions), and ``--precision auto``
    (the default) is the device's native precision, the same for every path."""
    import torch

    from elmtune import bench
    from elmtune.device import resolve_precision
    from elmtune.hardware import cpu_info

    assert bench.BenchTrainOptions().precision == "auto"
    result = {"seconds": 2.0, "tokens": 100, "supervised": 50, "computed": 120, "losses": [1.0, 1.0],
              "peak_bytes": 2**30, "matmul_params": 1000, "checkpointing": "off"}
    options = bench.BenchTrainOptions(precision=resolve_precision("auto", "cpu"))
    bench.report({"tutorial": result, "elmtune": {**result, "seconds": 1.0}}, 1e9, options, torch.device("cpu"))
    out = capsys.readouterr().out
    assert f"CPU: {cpu_info().model} (" in out and "bf16 in hardware:" in out
    assert f", {options.precision}, batch 8" in out
    assert options.precision == ("bf16" if cpu_info().bf16_features else "fp32")


def test_bench_generate_auto_dtype_follows_an_f16_gguf_to_the_same_weights(tmp_path, capsys, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'elmtune[llama]')")
    from elmtune.export_gguf import export_gguf
    from elmtune.models import weights16

    monkeypatch.setattr(weights16, "kernel_pays", lambda *args: True)
    base = save_tiny_base(tmp_path / "base")
    export_gguf(str(base), str(tmp_path / "m.gguf"), "f16")
    result = bench_generate(BenchGenerateOptions(model=str(base), new_tokens=6, prompt_tokens=5, device="cpu",
                                                 gguf=str(tmp_path / "m.gguf"), reference=False, repeats=1))
    assert result["dtype"] == "float16"  # auto: the GGUF's f16, not this CPU's fp32
    out = capsys.readouterr().out
    if weights16.kernel_available()[0]:
        assert "float16 weights, fp32 arithmetic (elmtune's CPU kernel)" in out
