"""Shared fixtures (helpers live in ``tests/helpers.py``), and the ``gpu`` marker's skip on machines without CUDA."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import shared_path

# elmtune caches what it measures about this machine (elmtune.hardware); tests measure into a folder of their own
# (subprocesses inherit it) and never read or fill the user's cache.
os.environ["ELMTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="elmtune-test-cache-")
atexit.register(shutil.rmtree, os.environ["ELMTUNE_CACHE_DIR"], True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are collected everywhere and skipped, with the reason, where no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA GPU; torch {torch.__version__} sees none here "
              f"({'a CPU build' if torch.version.cuda is None else 'no device visible'})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def cpu_kernel(monkeypatch):
    """elmtune's 16-bit CPU kernel (elmtune.models.weights16), used whatever this machine's probe says; the test is
    skipped, with the reason, where it does not run (not x86-64 with AVX2/FMA/F16C, no C compiler)."""
    from elmtune.models import weights16

    usable, reason = weights16.kernel_available()
    if not usable:
        pytest.skip(f"the 16-bit CPU kernel does not run here: {reason}")
    monkeypatch.setattr(weights16, "kernel_pays", lambda *args: True)


@pytest.fixture
def stack_steps(monkeypatch) -> list[bool]:
    """Each decode step offered to the C decode step (elmtune.models.decode.stack_step): True where it was taken."""
    from elmtune.models import decode, openelm

    taken = []

    def counting(*args):
        out = decode.stack_step(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(openelm, "stack_step", counting)
    return taken


@pytest.fixture
def golden_dir() -> Path:
    return shared_path("golden", "openelm", "tiny")
