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
