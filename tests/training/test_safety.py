"""Nothing lost: SIGKILL mid-run resumes to the bitwise-same adapter, SIGINT stops cleanly, partial checkpoints
are ignored, and two runs never write one directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from pathlib import Path

from transformers import Trainer

from elmtune.training import TrainError, TrainOptions, setup
from elmtune.training.safety import MANIFEST, is_complete, newest_complete_checkpoint
from tests.helpers import REPO_ROOT, tiny_run_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("safety")
    return tiny_run_inputs(directory, 48)


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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_a_checkpoint_and_exits_0(inputs, tmp_path, sig):
    out = tmp_path / "run"
    process = subprocess.Popen(command(inputs, out), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    wait_for(out / "checkpoints" / "checkpoint-5" / MANIFEST, process)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "--resume auto" in stdout and sig.name in stdout
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


def test_checkpoints_are_staged_then_renamed_into_place(inputs, tmp_path):
    """While the Trainer writes step N's files, ``checkpoint-N`` does not exist yet; once it exists it is whole."""
    base, data = inputs
    run = setup(TrainOptions(model=str(base), data=[str(data)], fields="zh", output_dir=str(tmp_path / "out"),
                             precision="fp32", max_steps=6, save_steps=2, save_total_limit=2, batch_size=4,
                             lora_r=4, lora_alpha=8, gradient_checkpointing="off"))
    checkpoints, seen = tmp_path / "out" / "checkpoints", []
    save_rng_state = run.trainer._save_rng_state

    def spy(output_dir):  # the last file the Trainer writes into a checkpoint
        step = run.trainer.state.global_step
        seen.append((Path(output_dir).relative_to(checkpoints).as_posix(), (checkpoints / f"checkpoint-{step}").exists()))
        save_rng_state(output_dir)

    run.trainer._save_rng_state = spy
    try:
        run.trainer.train()
    finally:
        run.close()
    assert seen == [(f".staging/checkpoint-{n}", False) for n in (2, 4, 6)]
    assert sorted(p.name for p in checkpoints.iterdir()) == [".staging", "checkpoint-4", "checkpoint-6"]  # limit 2
    assert not any((checkpoints / ".staging").iterdir())
    assert all(is_complete(checkpoints / name) for name in ("checkpoint-4", "checkpoint-6"))


def test_a_failed_checkpoint_write_stops_with_one_line_and_loses_nothing(inputs, tmp_path, capsys, monkeypatch):
    from elmtune.cli import main

    base, data = inputs
    args = command(inputs, tmp_path / "out")[3:]  # the CLI arguments, without `python -m elmtune.cli`
    save_rng_state = Trainer._save_rng_state

    def disk_full_at_step_10(self, output_dir):
        if self.state.global_step == 10:
            (Path(output_dir) / "optimizer.pt").write_bytes(b"half written")  # something partial to clean up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full_at_step_10)
    assert main(args) == 2
    output = capsys.readouterr().err
    err = output.strip().splitlines()[-1]  # progress bars come before
    assert err.startswith("elmtune train: error: ") and "Traceback" not in output
    assert "step 10: could not write" in err and "the disk is full" in err
    assert "last complete checkpoint is" in err and "checkpoint-5" in err and "--resume auto" in err
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name != ".staging") == ["checkpoint-5"]
    assert not any((checkpoints / ".staging").iterdir())
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)
    assert main([*args, "--resume", "auto"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_too_little_disk_space_is_refused_before_training(inputs, tmp_path, capsys, monkeypatch):
    from elmtune.cli import main

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 3 << 20))
    assert main(command(inputs, tmp_path / "out")[3:]) == 2
    output = capsys.readouterr().err
    err = output.strip().splitlines()[-1]
    assert "Traceback" not in output and "3.0 MiB free on its disk, but this run writes about" in err
    assert "12 checkpoint(s)" in err  # 60 steps, one save every 5
    assert not (tmp_path / "out" / "checkpoints").exists()


# --------------------------------------------------------------------------- a real full / read-only filesystem
# A private tmpfs in a user + mount namespace (``unshare -rm``): a real ENOSPC / EROFS, without needing root.

def _namespace_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


namespace = pytest.mark.skipif(not _namespace_available(),
                               reason="needs `unshare -rm` with tmpfs mounts (user namespaces) to make a small disk")


def in_namespace(mounts: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` (Python) after ``mounts`` (shell), in a private user + mount namespace."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f'{mounts} && exec "$0" "$@"', sys.executable,
                           "-c", textwrap.dedent(script), *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}, check=False)


FILL_AFTER_FIRST_SAVE = """
    import contextlib, errno, io, json, shutil, sys
    from pathlib import Path
    from elmtune.cli import main
    from elmtune.training import safety

    disk, keep, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    save = safety.AtomicCheckpointTrainer._save_checkpoint

    def fill_the_disk():
        with open(disk / "filler", "wb", buffering=0) as f:
            for block in (1 << 20, 4096, 1):
                try:
                    while True:
                        f.write(bytes(block))
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error

    def save_then_fill(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 5:
            fill_the_disk()

    safety.AtomicCheckpointTrainer._save_checkpoint = save_then_fill
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    checkpoints = disk / "out" / "checkpoints"
    result = {"code": code, "stderr": err.getvalue(), "checkpoints": sorted(p.name for p in checkpoints.iterdir()),
              "staged": sorted(p.name for p in (checkpoints / ".staging").iterdir())}
    (disk / "filler").unlink()
    safety.AtomicCheckpointTrainer._save_checkpoint = save
    result["resumed"] = main([*args, "--resume", "auto"])
    shutil.copy(disk / "out" / "adapter_model.safetensors", keep)
    print(json.dumps(result))
"""


@pytest.mark.slow  # ~30 s: a run on a filling disk, then its resume (CI runs it)
@namespace
def test_a_full_disk_mid_run_loses_nothing_and_resumes_to_the_same_adapter(inputs, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    args = [*command(inputs, disk / "out")[3:], "--max-steps", "15", "--logging-steps", "100"]
    done = in_namespace(f"mount -t tmpfs -o size=16m tmpfs {disk}", FILL_AFTER_FIRST_SAVE, str(disk),
                        str(tmp_path / "resumed.safetensors"), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 2
    message = result["stderr"].strip().splitlines()[-1]
    assert message.startswith("elmtune train: error: ") and "Traceback" not in result["stderr"], message
    assert "step 10: could not write" in message and "the disk is full" in message and "checkpoint-5" in message
    assert result["checkpoints"] == [".staging", "checkpoint-5"] and result["staged"] == []
    assert result["resumed"] == 0

    full = tmp_path / "full"
    args = [*command(inputs, full)[3:], "--max-steps", "15", "--logging-steps", "100"]
    subprocess.run([sys.executable, "-m", "elmtune.cli", *args], check=True, capture_output=True, cwd=REPO_ROOT,
                   env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    a, b = load_file(full / "adapter_model.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@namespace
def test_a_read_only_output_directory_is_refused_before_training(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = in_namespace(f"mount -t tmpfs -o ro tmpfs {out}", "import sys; from elmtune.cli import main; "
                        "sys.exit(main(sys.argv[1:]))", *command(inputs, out)[3:])
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and message == f"elmtune train: error: --output-dir {out}: not writable (Read-only file system)"


def test_an_output_directory_that_cannot_be_created_is_refused(inputs, tmp_path, capsys):
    from elmtune.cli import main

    (tmp_path / "a-file").write_text("")
    assert main(command(inputs, tmp_path / "a-file" / "out")[3:]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"elmtune train: error: --output-dir {tmp_path / 'a-file' / 'out'}: "
                                               "cannot create it (Not a directory)")
