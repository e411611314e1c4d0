"""Nothing lost: SIGKILL mid-run resumes to the bitwise-same adapter, SIGINT stops cleanly, partial checkpoints
are ignored, and two runs never write one directory."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from elmtune.training import TrainError, TrainOptions, setup
from elmtune.training.safety import MANIFEST, newest_complete_checkpoint
from tests.helpers import REPO_ROOT, save_tiny_base, write_varied_records


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("safety")
    return save_tiny_base(directory / "base"), write_varied_records(directory / "data.jsonl", 48)


def command(inputs, out, *extra):
    base, data = inputs
    return [sys.executable, "-m", "elmtune.cli", "train", "--model", str(base), "--data", str(data), "--fields", "zh",
            "--output-dir", str(out), "--max-steps", "60", "--save-steps", "5", "--batch-size", "2", "--grad-accum",
            "1", "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8", "--precision", "fp32", "--logging-steps", "5",
            "--gradient-checkpointing", "off", *extra]


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_sigkill_then_resume_gives_the_bitwise_same_adapter(inputs, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    subprocess.run(command(inputs, tmp_path / "full"), check=True, capture_output=True, cwd=REPO_ROOT, env=env)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(inputs, killed), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(killed / "checkpoints" / "checkpoint-20" / MANIFEST, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()
    resumed = subprocess.run(command(inputs, killed, "--resume", "auto"), capture_output=True, text=True,
                             cwd=REPO_ROOT, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_saves_a_checkpoint_and_exits_0(inputs, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(command(inputs, out), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    wait_for(out / "checkpoints" / "checkpoint-5" / MANIFEST, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "--resume auto" in stdout and "SIGINT" in stdout
    newest = newest_complete_checkpoint(out / "checkpoints")
    assert newest is not None and 5 <= int(newest.name.split("-")[1]) < 60


def test_partial_checkpoints_are_skipped(tmp_path):
    from elmtune.training.safety import write_manifest

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"state")
    write_manifest(tmp_path / "checkpoint-2")
    write_manifest(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"torn")  # changed after sealing: corrupt
    (tmp_path / "checkpoint-6").mkdir()  # a crash before the manifest
    assert newest_complete_checkpoint(tmp_path).name == "checkpoint-2"


def test_two_runs_cannot_share_an_output_directory(inputs, tmp_path):
    base, data = inputs
    options = TrainOptions(model=str(base), data=[str(data)], fields="zh", output_dir=str(tmp_path / "out"),
                           precision="fp32", max_steps=1)
    first = setup(options)
    try:
        with pytest.raises(ValueError, match="another elmtune run is writing there"):
            setup(TrainOptions(**{**vars(options), "overwrite": True}))
    finally:
        first.close()
    with pytest.raises(TrainError, match="already holds a run"):
        setup(options)


def poison_step(run, step: int) -> None:
    """Make the loss of optimizer step ``step`` NaN (as a bad batch or an overflow would)."""
    compute_loss = run.trainer.compute_loss

    def poisoned(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        return loss * float("nan") if run.trainer.state.global_step + 1 == step else loss

    run.trainer.compute_loss = poisoned


@pytest.mark.parametrize("policy", ["stop", "skip-step"])
def test_non_finite_loss_policies(inputs, tmp_path, policy):
    from elmtune.training import finish
    from elmtune.training.safety import NonFiniteError

    base, data = inputs
    run = setup(TrainOptions(model=str(base), data=[str(data)], fields="zh", output_dir=str(tmp_path / policy),
                             precision="fp32", max_steps=5, save_steps=2, batch_size=4, grad_accum=1, lr=1e-2,
                             lora_r=4, lora_alpha=8, gradient_checkpointing="off", nan_policy=policy))
    poison_step(run, 3)
    try:
        if policy == "stop":
            with pytest.raises(NonFiniteError, match=r"step 3: .*last good checkpoint is .*checkpoint-2"):
                run.trainer.train()
            assert all(torch.isfinite(p).all() for p in run.model.parameters())  # never applied
            assert run.trainer.state.global_step == 2
        else:
            run.trainer.train()
            finish(run)
            guard = next(cb for cb in run.trainer.callback_handler.callbacks if type(cb).__name__ == "NonFiniteGuard")
            assert guard.skipped == [3] and run.trainer.state.global_step == 5
            adapter = load_file(tmp_path / policy / "adapter_model.safetensors")
            assert all(torch.isfinite(t).all() for t in adapter.values())
    finally:
        run.close()
