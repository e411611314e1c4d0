"""The install itself: the CPU torch this project pins for its machines, and no CUDA wheels dragged in."""

from __future__ import annotations

import importlib.metadata as md
import os

import pytest
import torch


@pytest.mark.skipif(os.environ.get("ELMTUNE_TORCH"), reason="a custom torch was requested via ELMTUNE_TORCH")
@pytest.mark.skipif(torch.version.cuda is not None, reason=f"torch {torch.__version__} is a CUDA build, chosen for "
                                                           "this machine: the CPU-build check does not apply")
def test_installed_without_cuda_wheels():
    names = {(d.metadata["Name"] or "").lower() for d in md.distributions()}
    assert "elmtune" in names
    assert not [n for n in names if n.startswith("nvidia-")], "a CUDA build of torch (or its libraries) got installed"
    assert torch.version.cuda is None
