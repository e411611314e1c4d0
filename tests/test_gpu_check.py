"""scripts/gpu-check.sh: its dry run works on a CPU machine, and every GPU test lives where the script looks."""

from __future__ import annotations

import pytest

import subprocess
import sys

from tests.helpers import REPO_ROOT


@pytest.mark.slow  # ~33 s: the whole check script in dry-run mode (CI runs it)
def test_gpu_check_dry_run_prints_the_plan_and_checks_it():
    done = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "-m pytest -m gpu" in out and "bench train --model openelm-3b" in out and "bench generate" in out
    assert "bench commands parse" in out
    assert "bench arguments  ok" in out and "gpu tests found  ok" in out


def test_every_gpu_test_is_in_a_file_the_check_runs():
    """gpu-check.sh runs `pytest -m gpu` over tests/**/test_gpu*.py only (the other test modules import packages
    a bare GPU host may lack): a gpu-marked test elsewhere would never run there."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "tests"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert ids, done.stdout[-2000:]
    assert all(line.split("::")[0].rsplit("/", 1)[-1].startswith("test_gpu") for line in ids), ids
