"""Decoding on a CPU from 16-bit weights with fp32 arithmetic — llama.cpp's ``f16`` way, inside PyTorch.

At batch 1 a decode step is one matrix-vector product per weight: its time is the weights' bytes over the memory
bandwidth, so fp32 weights cost twice what 16-bit ones do.  PyTorch has no CPU kernel that reads 16-bit weights
and multiplies in fp32: its fp16/bf16 ``linear`` computes in 16 bits (bf16 in software on AVX2 CPUs) and at a few
rows is several times slower than at one (measured on a 2-core AVX2 EPYC: 3840 × 1280 fp16, 8 rows ≈ 4 ms, more
than fp32).  So :file:`kernels/gemv16.c` (≈ 120 lines) does exactly that one thing: each weight is read once per
call and widened to fp32 in registers — at batch 1 each thread streams whole weight rows front to back, with a
few rows of activations three weight rows at a time are multiplied into up to four of them.  Built with it,
:file:`kernels/decode_step.c` runs a whole one-token decode step of a prepared model (see
:mod:`elmtune.models.decode`).

:func:`prepare` turns a model loaded in fp16 or bf16 on a CPU into that form — every ``nn.Linear`` and
``nn.Embedding`` keeps its 16-bit weight (the tied output head is the embedding) and computes in fp32, the
norms' weights become fp32 — where the kernel is usable here: an x86-64 CPU with AVX2, FMA and F16C, a C
compiler (the kernel is built once per machine into elmtune's cache folder, :func:`elmtune.hardware.cache_dir`),
a self-check against ``torch`` and a short probe that finds it faster than PyTorch's own 16-bit ``linear`` on this
machine.  Elsewhere the model stays as loaded.  Activations, the KV cache and the logits are fp32; the result
equals fp32 arithmetic on the 16-bit-rounded weights up to summation order (tests/models/test_weights16.py).
Rows beyond :data:`KERNEL_ROWS` (a long prompt's prefill) go through ``F.linear`` on an fp32 copy of the weight.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("elmtune")

#: The C sources of elmtune's CPU kernel library: the 16-bit-weight product, and the one-token decode step
#: built on it (used by :func:`elmtune.models.decode.stack_step`).
SOURCES = tuple(Path(__file__).with_name("kernels") / name for name in ("gemv16.c", "decode_step.c"))
#: The CPU flags the kernel is compiled for (/proc/cpuinfo names).
NEEDS = ("avx2", "fma", "f16c")
#: Up to this many rows (tokens × sequences) a call goes through the kernel; more (a long prompt's prefill) through
#: F.linear on an fp32 copy of the weight.  Over a 270M model's weights on a 2-core AVX2 EPYC the kernel measured
#: faster at every row count tried, 8 to 128 (63 against 319 ms at 8 rows, 588 against 846 ms at 128: the copy
#: costs more than the kernel's lower FLOP rate); the two cross near 500 rows by extrapolation.
KERNEL_ROWS = 256
#: How much faster than PyTorch's own 16-bit linear the kernel must measure to be used.
MARGIN = 0.05


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build() -> Path:
    """The compiled kernel in the cache folder (compiled now if absent, written atomically); raises on failure."""
    from ..hardware import cache_dir

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH; set CC")
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), version, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"elmtune-cpu-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *flags, *map(str, SOURCES), "-o", str(built)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


@lru_cache(maxsize=1)
def loaded() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library, "") or (None, why it cannot be used here)."""
    from ..hardware import cpu_info

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernel is for x86-64 CPUs (this is {platform.machine()})"
    missing = [flag for flag in NEEDS if flag not in cpu_info().flags]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}"
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"the kernel could not be built: {error}"
    pointer, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    function = library.elmtune_gemv16
    function.restype = None
    function.argtypes = [pointer, pointer, pointer, i64, i64, i64, i32, i32]
    step = library.elmtune_decode_step
    step.restype = i32
    step.argtypes = [pointer, pointer, pointer, i64, pointer, pointer, i64, i64, i64, i64, pointer, pointer, pointer,
                     i64, pointer, pointer, f32, f32, i32, i32]
    for dtype in (torch.float16, torch.bfloat16):  # the self-check: a kernel that computes wrong is never used
        generator = torch.Generator().manual_seed(0)
        w = torch.randn(37, 72, generator=generator).to(dtype)
        for rows in (1, 5):  # the one-row path (batch-1 decoding) and the multi-row one
            x = torch.randn(rows, 72, generator=generator)
            if not torch.allclose(_kernel_linear(function, x, w), x @ w.float().T, rtol=1e-4, atol=1e-4):
                return None, f"the kernel's self-check failed in {dtype} on {rows} row(s)"
    return library, ""


@lru_cache(maxsize=1)
def _library():
    """(the 16-bit-weight product, "") or (None, why it cannot be used here)."""
    library, reason = loaded()
    return (None, reason) if library is None else (library.elmtune_gemv16, "")


def _kernel_linear(function, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., K] fp32 @ weight [N, K] (16-bit).T`` through the kernel, as ``[..., N]`` fp32."""
    x = x.contiguous()
    out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)
    function(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], weight.shape[0],
             x.shape[-1], weight.dtype == torch.bfloat16, torch.get_num_threads())
    return out


def kernel_available() -> tuple[bool, str]:
    """(whether the kernel runs here, why not)."""
    function, reason = _library()
    return function is not None, reason


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for fp32 ``x [..., K]`` and a 16-bit ``weight [N, K]``, in fp32.

    Called ~65 times per decode step of the 270M model, so the kernel's path does as little as it can in Python."""
    in_features = x.shape[-1]
    rows = x.numel() // in_features
    function = _library()[0] if weight.device.type == x.device.type == "cpu" else None
    if (function is None or x.dtype != torch.float32 or weight.dtype not in (torch.float16, torch.bfloat16)
            or rows > KERNEL_ROWS or in_features % 8 or not weight.is_contiguous()
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight.to(x.dtype))
    return _kernel_linear(function, x, weight)


class Linear16(nn.Linear):
    """An ``nn.Linear`` whose weight stays 16-bit and whose arithmetic is fp32 (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x.float(), self.weight)
        return out if self.bias is None else out + self.bias.float()


class Embedding16(nn.Embedding):
    """An ``nn.Embedding`` with a 16-bit table that hands out fp32 rows."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


#: The decode batches the probe times (one sequence, and a server's or ``generate``'s batch of eight).
PROBE_ROWS = (1, 8)


@lru_cache(maxsize=None)
def kernel_pays(dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether the kernel is faster here than PyTorch's own ``linear`` in ``dtype`` on a ``[out_features,
    in_features]`` weight, over decode steps of 1 and of 8 rows together (:data:`PROBE_ROWS`); measured once per
    machine (:func:`elmtune.hardware.measured`).  Without probing (``ELMTUNE_PROBE=0``) the kernel is used wherever
    it runs."""
    from ..hardware import best_times, measured

    def measure() -> dict:
        generator = torch.Generator().manual_seed(0)
        w = torch.randn(out_features, in_features, generator=generator).to(dtype)
        xs = [torch.randn(rows, in_features, generator=generator) for rows in PROBE_ROWS]

        def kernel():
            for x in xs:
                linear(x, w)

        def native():
            for x in xs:
                F.linear(x.to(dtype), w).float()

        times = best_times({"kernel": kernel, "torch": native}, repeats=5)
        return {"kernel_s": round(times["kernel"], 6), "torch_s": round(times["torch"], 6),
                "kernel": times["kernel"] <= (1 - MARGIN) * times["torch"]}

    result = measured("cpu-decode-weights16", {"dtype": str(dtype), "rows": list(PROBE_ROWS),
                                               "shape": [out_features, in_features]}, measure)
    return True if result is None else bool(result["kernel"])


def prepare(model: nn.Module) -> str:
    """Make a 16-bit model on a CPU decode through the kernel (see the module doc), in place.

    Returns what was done, for logs: ``""`` when nothing was (not on a CPU, not 16-bit, or the kernel does not run
    or does not pay here; the reason is logged at debug level).  A prepared model is for inference on this CPU:
    its norms' parameters are fp32 (its state dict mixes dtypes), and moved to a GPU its 16-bit layers would
    multiply by fp32 copies of their weights."""
    weights = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))
               and m.weight.dtype in (torch.float16, torch.bfloat16) and m.weight.device.type == "cpu"]
    if not weights:
        return ""
    usable, reason = kernel_available()
    dtype = weights[0].weight.dtype
    largest = max((m for m in weights if isinstance(m, nn.Linear)), key=lambda m: m.weight.numel(), default=None)
    if not usable or largest is None or not kernel_pays(dtype, *largest.weight.shape):
        log.debug("16-bit CPU decoding kernel not used: %s", reason or "PyTorch's own linear measured as fast here")
        return ""
    for module in weights:
        module.__class__ = Linear16 if isinstance(module, nn.Linear) else Embedding16
    for module in model.modules():  # norms and anything else: fp32 parameters, as the arithmetic
        if not isinstance(module, (Linear16, Embedding16)):
            for name, parameter in list(module.named_parameters(recurse=False)):
                if parameter.dtype in (torch.float16, torch.bfloat16):
                    parameter.data = parameter.data.float()
    name = str(dtype).removeprefix("torch.")
    return f"{name} weights, fp32 arithmetic (elmtune's CPU kernel)"
