"""Where a command runs and in which dtype: one decision, used by every command that loads a model.

Device: ``auto`` is CUDA (the process's own GPU under torchrun: ``LOCAL_RANK``), then Apple's ``mps``, then the
CPU; ``--device`` names one (``cuda``, ``cuda:1``, ``mps``, ``cpu``).

Dtype: ``auto`` is the fastest one the device computes *natively* — never one it only emulates:

* CUDA: bf16 from compute capability 8.0 (Ampere: A100, RTX 30xx, H100 …); fp16 before it (T4, V100: bf16 there
  is emulated, several times slower, and ``torch.cuda.is_bf16_supported()`` counts the emulation);
* Apple ``mps``: fp16 (the half type every Apple GPU computes natively);
* CPU: bf16 when it has AVX-512-BF16 or AMX-BF16 instructions, else fp32 (bf16 would be converted in software).

Training names its dtype ``--precision`` (bf16, fp16 with loss scaling, fp32); inference commands ``--dtype``.
Both accept ``auto`` and the short and long names (``bf16`` / ``bfloat16`` …).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("elmtune")

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
PRECISION_OF = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
#: What ``--dtype`` / ``--device`` accept (for argparse choices and help).
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
DEVICE_HELP = "cuda, cuda:N, mps or cpu (default auto: the GPU if there is one, else mps, else the CPU)"
DTYPE_HELP = ("weight dtype: auto = bf16 where the device computes it natively (Ampere+ GPUs, CPUs with "
              "AVX-512-BF16/AMX), fp16 on older GPUs and mps, else fp32.  On a CPU, fp16/bf16 weights stay 16-bit "
              "and compute in fp32 through elmtune's decoding kernel where it runs and pays (fastest CPU decoding)")


class DeviceError(ValueError):
    """A device or dtype that cannot be used here; the message says what to choose instead."""


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX-512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_native_bf16(index: int | None = None) -> bool:
    """True from compute capability 8.0 on (Ampere and later); earlier GPUs only emulate bf16."""
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 8


def local_rank() -> int:
    """This process's index on its node under torchrun / accelerate launch (0 when run alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(requested: str | None = "auto") -> torch.device:
    """The device to run on: ``requested``, checked, or for ``auto`` / None the best one present (see module doc)."""
    name = (requested or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() if local_rank() < torch.cuda.device_count() else 0)
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {requested!r}: not a device; use {DEVICE_HELP.split(' (')[0]}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {requested}: no CUDA GPU is available here (torch {torch.__version__}"
                              f"{' is a CPU build' if torch.version.cuda is None else ''}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"numbered from 0")
    elif device.type == "mps" and not mps_available():
        raise DeviceError(f"--device {requested}: Apple's mps is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {requested}: elmtune runs on cuda, mps or cpu")
    return device


def best_dtype(device: torch.device | str) -> torch.dtype:
    """The fastest dtype ``device`` computes natively (see module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if cuda_native_bf16(device.index) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def pick_dtype(device: torch.device | str, requested: str | torch.dtype | None = "auto") -> torch.dtype:
    """``requested`` as a torch dtype, or for ``auto`` / None the best native one for ``device``."""
    if isinstance(requested, torch.dtype):
        return requested
    name = (requested or "auto").strip().lower()
    if name == "auto":
        return best_dtype(device)
    if name not in DTYPES:
        raise DeviceError(f"--dtype {requested!r}: use one of {', '.join(DTYPE_CHOICES)}")
    dtype = DTYPES[name]
    device = torch.device(device)
    if dtype == torch.bfloat16 and device.type == "cuda" and not cuda_native_bf16(device.index):
        log.warning("bf16 on %s (compute capability %s) is emulated and slow; fp16 is native there",
                    torch.cuda.get_device_name(device), ".".join(map(str, torch.cuda.get_device_capability(device))))
    return dtype


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """A training ``--precision`` (auto, bf16, fp16, fp32) made concrete for ``device`` (default: auto's device).

    ``auto`` follows :func:`best_dtype`, except on ``mps``, where training stays in fp32 (fp16 training needs loss
    scaling that PyTorch's mps backend does not fully support).
    """
    if precision != "auto":
        return PRECISION_OF[DTYPES[precision]]
    device = pick_device("auto") if device is None else torch.device(device)
    if device.type == "mps":
        return "fp32"
    return PRECISION_OF[best_dtype(device)]


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """``cuda:0 (NVIDIA H200), bf16`` — for logs and summaries."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return f"{device}{f' ({name})' if name else ''}, {PRECISION_OF.get(dtype, str(dtype))}"
