"""elmtune.hardware: the CPU's description, and probes measured once per machine and cached."""

from __future__ import annotations

import json

import pytest

from elmtune import hardware
from elmtune.hardware import CpuInfo, best_times, cpu_info, measured


def test_cpu_info_names_the_cpu_and_its_bf16_instructions():
    info = cpu_info()
    assert info.model and info.model != "unknown CPU"
    amx = CpuInfo("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    assert amx.bf16_features == ["AVX-512-BF16", "AMX-BF16"]
    avx2 = CpuInfo("AMD EPYC", frozenset({"avx2", "fma"}))
    assert avx2.bf16_features == [] and "bf16 in hardware: none" in avx2.describe()
    assert avx2.describe().startswith("AMD EPYC (")


def test_a_probe_is_measured_once_per_machine_and_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMTUNE_CACHE_DIR", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return {"fast": len(calls)}

    assert measured("demo", {"n": 1}, measure) == {"fast": 1}
    assert measured("demo", {"n": 1}, measure) == {"fast": 1}  # from the cache: not measured again
    assert len(calls) == 1
    assert measured("demo", {"n": 2}, measure) == {"fast": 2}  # other inputs: measured
    files = sorted((tmp_path / "probes").glob("demo-*.json"))
    assert len(files) == 2
    stored = json.loads(files[0].read_text())
    assert stored["machine"]["cpu"] == cpu_info().model and "torch" in stored["machine"]
    # another machine (here: another torch version) does not read this one's result
    monkeypatch.setattr(hardware.torch, "__version__", "0.0-other")
    assert measured("demo", {"n": 1}, measure) == {"fast": 3}


def test_probing_can_be_turned_off_and_a_broken_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ELMTUNE_PROBE", "0")
    assert measured("demo", {}, lambda: pytest.fail("measured although probing is off")) is None
    assert not (tmp_path / "probes").exists()
    monkeypatch.setenv("ELMTUNE_PROBE", "1")
    assert measured("demo", {}, lambda: {"x": 1}) == {"x": 1}
    (file,) = (tmp_path / "probes").glob("demo-*.json")
    monkeypatch.setenv("ELMTUNE_PROBE", "0")  # off means the defaults, even with a result cached
    assert measured("demo", {}, lambda: pytest.fail("measured although probing is off")) is None
    monkeypatch.setenv("ELMTUNE_PROBE", "1")
    file.write_text("{not json")
    assert measured("demo", {}, lambda: {"x": 2}) == {"x": 2}


def test_best_times_times_every_candidate():
    calls = {"a": 0, "b": 0}

    def bump(name):
        def run():
            calls[name] += 1
        return run

    times = best_times({"a": bump("a"), "b": bump("b")}, repeats=3)
    assert set(times) == {"a", "b"} and all(0 <= t < 1 for t in times.values())
    assert calls == {"a": 4, "b": 4}  # a warm-up and three timed calls each


def _probe_on_rank(rank: int, init: str, cache: str, results) -> None:
    import os

    import torch.distributed as dist

    from elmtune.hardware import probes_agreed_across_ranks

    os.environ["ELMTUNE_CACHE_DIR"] = cache
    os.environ["ELMTUNE_PROBE"] = "1"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        with probes_agreed_across_ranks():
            results[("agreed", rank)] = measured("ranks", {"n": 1}, lambda: {"measured_on": rank})
        # outside the block each rank measures for itself (rank 1 alone: it must not wait for rank 0)
        if rank == 1:
            results[("alone", rank)] = measured("ranks", {"n": 2}, lambda: {"measured_on": rank})
        with probes_agreed_across_ranks():  # rank 0's failure reaches rank 1 instead of leaving it waiting
            try:
                measured("ranks", {"n": 3}, lambda: 1 / 0 if rank == 0 else {"measured_on": rank})
            except (ZeroDivisionError, RuntimeError) as error:
                results[("failed", rank)] = type(error).__name__
    finally:
        dist.destroy_process_group()


def test_under_torchrun_rank_0_measures_and_every_rank_takes_its_result(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_probe_on_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "cache"), results),
                 nprocs=2)
        assert dict(results) == {("agreed", 0): {"measured_on": 0}, ("agreed", 1): {"measured_on": 0},
                                 ("alone", 1): {"measured_on": 1},
                                 ("failed", 0): "ZeroDivisionError", ("failed", 1): "RuntimeError"}
