"""Hardware-dependent choices, made on the machine that runs: from the CPU's features and short measured probes.

Speed choices that paid on one CPU cost on another (CPU flash-attention backward was ~3× faster in fp32 than in
bf16 on an AVX-512 CPU without AMX; on an AMX CPU bf16 kernels are the fast ones; on an AVX2-only CPU bf16
matmuls are computed in software: 0.4 against 5.6 GFLOP/s in fp32 at 512 × 512 on an AVX2 EPYC).  So elmtune
does not carry constants tuned on one machine: where a choice depends on the hardware it is read from the CPU's
flags or *measured* by a probe of a few seconds at most, the first time it is needed, and the result is cached
per machine:

* :func:`cpu_info` — the CPU's model name and flags (``/proc/cpuinfo``; ``sysctl`` on macOS), and which bf16
  instructions it has (AVX-512-BF16, AMX-BF16), as ``elmtune bench train`` prints them;
* :func:`measured` — a probe's result, read from the cache or measured now and stored.  The cache lives in
  ``$ELMTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/elmtune``, else ``~/.cache/elmtune`` (``probes/NAME-HASH.json``,
  one small JSON file per probe, written atomically), keyed by the CPU model, its flags, the torch version and
  thread count, the GPU's name where one is used, and the probe's own inputs (shapes, dtypes).  Delete the
  folder to measure again.  ``ELMTUNE_PROBE=0`` turns probing off: every choice then takes its documented
  default (nothing is measured or written).

The probes themselves live next to the choice they make (packed attention's precision in
:mod:`elmtune.models.openelm`, the checkpointing policy in :mod:`elmtune.training.checkpointing`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("elmtune")

#: /proc/cpuinfo flag → the name users know it by (the bf16 instructions a CPU may compute in hardware).
BF16_FLAGS = {"avx512_bf16": "AVX-512-BF16", "amx_bf16": "AMX-BF16"}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def bf16_features(self) -> list[str]:
        """The bf16 instruction sets this CPU has (empty: bf16 is converted in software)."""
        return [name for flag, name in BF16_FLAGS.items() if flag in self.flags]

    @property
    def vector_isa(self) -> str:
        """The widest vector instructions PyTorch uses here (``AVX512``, ``AVX2``, ``NEON`` …)."""
        try:
            return torch.backends.cpu.get_cpu_capability()
        except (AttributeError, RuntimeError):
            return platform.machine()

    def describe(self) -> str:
        """``AMD EPYC (AVX2; bf16 in hardware: none)`` — for ``bench train`` and logs."""
        bf16 = ", ".join(self.bf16_features) or "none"
        return f"{self.model} ({self.vector_isa}; bf16 in hardware: {bf16})"


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU: the first processor's model name and flags."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:  # x86, ARM
                flags = value.strip()
            if model and flags:
                break
    except OSError:
        pass
    if not model and platform.system() == "Darwin":
        try:
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown CPU",
                   frozenset(flags.split()))


def cache_dir() -> Path:
    """Where probe results are kept (see the module doc)."""
    if os.environ.get("ELMTUNE_CACHE_DIR"):
        return Path(os.environ["ELMTUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "elmtune"


def probing_enabled() -> bool:
    return os.environ.get("ELMTUNE_PROBE", "1").strip().lower() not in ("0", "off", "false", "no")


def machine_key(device: torch.device | str = "cpu") -> dict:
    """What a measured result depends on besides the probe's own inputs."""
    device = torch.device(device)
    cpu = cpu_info()
    key = {"cpu": cpu.model, "flags": sorted(cpu.flags), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "device": device.type}
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


def measured(name: str, inputs: dict, measure: Callable[[], dict], device: torch.device | str = "cpu") -> dict | None:
    """Probe ``name``'s result for ``inputs`` on this machine: from the cache, or ``measure()``d now and stored.

    None when probing is turned off (``ELMTUNE_PROBE=0``): every choice then takes its documented default, whatever
    is cached.  A cache that cannot be read or written is ignored (the probe is then measured again next time),
    never an error.  The measurement runs in a thread of its own (:func:`isolated`).  Under torchrun, within
    :func:`probes_agreed_across_ranks`, only rank 0 measures and every rank gets its result.
    """
    if not probing_enabled():
        return None
    if _agreeing and _ranks() > 1:
        return _measured_on_rank_0(name, inputs, measure, device)
    return _measured_here(name, inputs, measure, device)


_agreeing = 0


@contextlib.contextmanager
def probes_agreed_across_ranks():
    """Within this block, under torchrun, probes are collective: rank 0 measures (or reads its cache) and every
    rank takes its result — the ranks would otherwise time each other's load and could choose differently.  For a
    training run's setup, which every rank runs alike; outside it each process measures for itself, so a probe
    that one rank alone reaches (an evaluation on rank 0) never waits for the others."""
    global _agreeing
    _agreeing += 1
    try:
        yield
    finally:
        _agreeing -= 1


def _measured_on_rank_0(name: str, inputs: dict, measure: Callable[[], dict], device: torch.device | str) -> dict:
    import torch.distributed as dist

    payload: list = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", _measured_here(name, inputs, measure, device))
        except Exception as error:  # noqa: BLE001 — handed to every rank, then raised here too
            dist.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":  # the other ranks fail with rank 0 instead of waiting for it until a timeout
        raise RuntimeError(f"probe {name!r} failed on rank 0: {value}")
    return value


def _ranks() -> int:
    """The number of processes in the default process group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _measured_here(name: str, inputs: dict, measure: Callable[[], dict], device: torch.device | str) -> dict:
    key = {"probe": name, "inputs": inputs, "machine": machine_key(device)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "probes" / f"{name}-{digest}.json"
    try:
        return json.loads(path.read_text())["result"]
    except (OSError, ValueError, KeyError):
        pass
    start = time.perf_counter()
    result = isolated(measure)
    log.info("measured %s on this machine in %.1f s: %s (cached in %s)", name, time.perf_counter() - start, result,
             path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            json.dump({**key, "result": result, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}, tmp, indent=1)
        os.replace(tmp.name, path)
    except OSError as error:
        log.debug("could not cache probe %s: %s", name, error)
    return result


def isolated(fn: Callable[[], dict]) -> dict:
    """``fn()`` in a fresh thread, out of the caller's autograd state.

    A probe is first needed lazily, inside a training forward: under activation checkpointing (whose saved-tensor
    hooks would record the probe's own tensors and break the recomputation's count), under ``no_grad`` (its
    backward would fail) or under autocast.  Grad mode, autocast and saved-tensor hooks are thread-local, so a new
    thread starts clean; the caller's CUDA device is made current there too.
    """
    from concurrent.futures import ThreadPoolExecutor

    cuda = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run() -> dict:
        if cuda is not None:
            torch.cuda.set_device(cuda)
        return fn()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def best_times(candidates: dict[str, Callable[[], object]], repeats: int = 3,
               device: torch.device | str = "cpu") -> dict[str, float]:
    """The fastest of ``repeats`` timed calls of each candidate, in seconds: one untimed warm-up call each, then
    the candidates' timed calls interleaved (so a slower spell of a shared machine hits them alike)."""
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in candidates.values():
        fn()
    sync()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
