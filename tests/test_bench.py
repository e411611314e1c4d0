"""`elmtune bench generate` on a tiny checkpoint: it runs where it is told and measures something."""

from __future__ import annotations

from elmtune.bench import BenchGenerateOptions, bench_generate, matmul_peak
from tests.helpers import save_tiny_base


def test_bench_generate_measures_on_the_chosen_device_and_dtype(tmp_path, capsys):
    base = save_tiny_base(tmp_path / "base")
    rates = bench_generate(BenchGenerateOptions(model=str(base), new_tokens=4, prompt_tokens=4, dtype="fp32",
                                                device="cpu"))
    assert set(rates) == {1, 8} and all(rate > 0 for rate in rates.values())
    assert "on cpu, fp32" in capsys.readouterr().out


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
