"""`elmtune train` under torchrun: 2 CPU processes (gloo) must train exactly what one process trains.

Every run passes ``--device cpu``: on a machine with fewer GPUs than processes, each process would otherwise be
refused (it would have no GPU of its own).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO_ROOT, tiny_run_inputs

TIMEOUT = 240  # seconds for one training run (they take ~10 s)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dist")
    tiny_run_inputs(directory, 40)
    return directory


def train_cli(directory, out, *extra, nproc: int = 1):
    args = ["train", "--model", str(directory / "base"), "--data", str(directory / "data.jsonl"), "--fields", "zh",
            "--output-dir", str(out), "--max-steps", "4", "--save-steps", "2", "--lr", "5e-2", "--lora-r", "4",
            "--lora-alpha", "8", "--lora-dropout", "0", "--precision", "fp32", "--logging-steps", "1",
            "--gradient-checkpointing", "off", "--device", "cpu", *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port())] if nproc > 1 else [sys.executable]
    # A hang (e.g. at exit) fails with every process's Python stack: faulthandler dumps them on SIGABRT.
    process = subprocess.Popen([*launcher, "-m", "elmtune.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, start_new_session=True,
                               env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                                    "PYTHONFAULTHANDLER": "1"})
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {TIMEOUT} s; stacks:\n{stderr[-8000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter(out):
    return load_file(out / "adapter_model.safetensors")


def assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), (key, (a[key] - b[key]).abs().max())


def test_two_ranks_equal_one_process_with_the_same_global_batch(setup_dir, tmp_path):
    train_cli(setup_dir, tmp_path / "single", "--batch-size", "4")
    train_cli(setup_dir, tmp_path / "ddp", "--batch-size", "2", nproc=2)
    assert_same(adapter(tmp_path / "single"), adapter(tmp_path / "ddp"))
    # only rank 0 wrote: one metrics line per step, not two
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow  # ~45 s: three 2-process runs (CI runs it; the 2-rank equality test stays in the default run)
def test_two_rank_resume_equals_an_uninterrupted_two_rank_run(setup_dir, tmp_path):
    full = tmp_path / "full"
    train_cli(setup_dir, full, "--batch-size", "2", nproc=2)
    # the same run, "interrupted" after its step-2 checkpoint: everything written after it is gone
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (resumed / name).unlink()
    train_cli(setup_dir, resumed, "--batch-size", "2", "--resume", "auto", nproc=2)
    assert_same(adapter(full), adapter(resumed), atol=0)
    # resuming with another world size is refused with a clear message
    changed = subprocess.run(
        [sys.executable, "-m", "elmtune.cli", "train", "--model", str(setup_dir / "base"), "--data",
         str(setup_dir / "data.jsonl"), "--fields", "zh", "--output-dir", str(resumed), "--resume",
         str(resumed / "checkpoints" / "checkpoint-2"), "--max-steps", "4"], capture_output=True, text=True,
        cwd=REPO_ROOT, timeout=300)
    assert changed.returncode == 2 and "2 processes" in changed.stderr and "1 process" in changed.stderr
