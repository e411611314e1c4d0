"""Runs that lose nothing: atomic, verified checkpoints, a graceful stop on SIGINT/SIGTERM, one writer per
directory, a disk-space check before training."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

log = logging.getLogger("elmtune")
MANIFEST = "elmtune-manifest.json"
STAGING = ".staging"  # checkpoints/.staging/checkpoint-N: where a checkpoint is written before it is renamed


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, permissions); the previous complete one is untouched."""


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:  # the bytes just hashed are on disk before the manifest vouches for them
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(checkpoint: Path) -> None:
    """Record every file of a finished checkpoint with its checksum (files synced to disk first); the manifest
    itself is written last, atomically (tmp + rename)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)}
             for p in sorted(checkpoint.iterdir()) if p.is_file() and p.name != MANIFEST}
    tmp = checkpoint / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"files": files}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint / MANIFEST)
    _fsync_directory(checkpoint)


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint counts only if its manifest exists and every file matches it."""
    try:
        files = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((checkpoint / name).is_file() and (checkpoint / name).stat().st_size == meta["bytes"]
               and _sha256(checkpoint / name) == meta["sha256"] for name, meta in files.items())


def newest_complete_checkpoint(directory: Path) -> Path | None:
    """The highest-step ``checkpoint-N`` that is complete; partial ones (a crash mid-save) are skipped, loudly."""
    if not directory.is_dir():
        return None
    found = sorted((p for p in directory.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for checkpoint in found:
        if is_complete(checkpoint):
            return checkpoint
        log.warning("skipping %s: incomplete (no valid %s), probably interrupted while saving", checkpoint, MANIFEST)
    return None


class AtomicCheckpointTrainer(Trainer):
    """transformers' Trainer whose checkpoints appear whole or not at all.

    Each checkpoint is written into ``checkpoints/.staging/checkpoint-N`` (by every rank: each saves its own RNG
    state), sealed with a manifest, synced, and only then renamed to ``checkpoints/checkpoint-N`` — a crash,
    a kill or a full disk mid-save leaves at most a staging directory, never a ``checkpoint-N`` that is not
    complete.  A write error removes the staging directory and stops the run with a :class:`CheckpointWriteError`
    that names the last complete checkpoint.

    With ``loss_guard`` set (under DeepSpeed, where the gradients are out of reach), each training loss is checked
    by :meth:`NonFiniteGuard.check_loss` before its backward pass.
    """

    loss_guard: "NonFiniteGuard | None" = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if self.loss_guard is not None and model.training:
            self.loss_guard.check_loss(result[0] if isinstance(result, tuple) else result, self.state.global_step)
        return result

    def _save_checkpoint(self, model, trial):
        parent = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staged = parent / STAGING / name
        try:
            if self.is_world_process_zero():
                shutil.rmtree(staged, ignore_errors=True)  # left over from a crash mid-save
                staged.parent.mkdir(parents=True, exist_ok=True)
            self.accelerator.wait_for_everyone()
            self.args.output_dir = str(staged.parent)  # the Trainer writes OUTPUT_DIR/checkpoint-N
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(parent)
            self.accelerator.wait_for_everyone()  # every rank's files are in place
            if self.is_world_process_zero():
                write_manifest(staged)
                target = parent / name
                if target.exists():  # the same step saved again (e.g. by an older run that was not sealed)
                    shutil.rmtree(target)
                os.replace(staged, target)
                _fsync_directory(parent)
                rotate_checkpoints(str(parent), self.args.save_total_limit)
        except OSError as error:
            shutil.rmtree(staged, ignore_errors=True)
            good = newest_complete_checkpoint(parent)
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            what, fix = ("the disk is full", "free space") if full else (error.strerror or str(error), "fix that")
            raise CheckpointWriteError(
                f"step {self.state.global_step}: could not write {parent / name}: {what}. Nothing partial was left "
                + (f"behind; the last complete checkpoint is {good}: {fix} and rerun with --resume auto"
                   if good else f"behind; no complete checkpoint exists yet: {fix} and start again")) from None
        self.accelerator.wait_for_everyone()


def save_atomically(directory: Path, write) -> None:
    """``write(staging_dir)``, then move each file it wrote into ``directory`` with an atomic rename: a reader
    (or a crash) sees every output file either old or new, never half written."""
    staging = directory / STAGING / "final"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
        for path in sorted(staging.iterdir()):
            with path.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(path, directory / path.name)
        _fsync_directory(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.parent.rmdir()
        except OSError:  # not empty (a checkpoint being staged) or already gone
            pass


def check_free_space(directory: Path, need: int, what: str) -> None:
    """Refuse to start a run whose checkpoints and adapter would not fit on the output directory's disk."""
    free = shutil.disk_usage(directory).free
    if free < need:
        def mib(n):
            return f"{n / 2**20:,.1f} MiB"

        raise ValueError(f"--output-dir {directory}: {mib(free)} free on its disk, but this run writes about "
                         f"{mib(need)} ({what}); free space, set --save-total-limit, or choose another directory")


class GracefulStop(TrainerCallback):
    """SIGINT / SIGTERM: finish the current step, save a checkpoint, stop cleanly (a second signal aborts)."""

    def __init__(self):
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        if self.requested:  # second signal: the user insists
            self.restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and saving a checkpoint (again to abort now)",
                    self.requested)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RunLock:
    """An exclusive lock on ``OUTPUT_DIR/.elmtune.lock`` for the life of the run: two runs never share a directory."""

    def __init__(self, directory: Path):
        self.path = directory / ".elmtune.lock"
        self.handle = self.path.open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise ValueError(f"--output-dir {directory}: another elmtune run is writing there right now") from None

    def release(self) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


class NonFiniteError(ValueError):
    """Training produced a non-finite loss or gradient."""


class NonFiniteGuard(TrainerCallback):
    """Before each optimizer step, check the gradients: a NaN/inf means the step would poison the weights.

    ``stop``: raise before the update, naming the step — nothing bad is saved, the last checkpoint stays good.
    ``skip-step``: drop this step's gradients (the optimizer then leaves the weights and its own state alone:
    PyTorch optimizers skip parameters without a gradient) and go on; skipped steps are counted.
    Under fp16 the GradScaler already skips overflowing steps (and lowers its scale), so the guard stands aside.

    Under DeepSpeed the engine steps inside backward and keeps the gradients in its own partitions: the callback
    would see nothing.  There :meth:`check_loss` runs instead, on every micro-batch's loss before its backward
    (``stop`` only: ``skip-step`` is refused with DeepSpeed before the run starts).
    """

    def __init__(self, policy: str, checkpoints: Path):
        self.policy, self.checkpoints = policy, checkpoints
        self.skipped: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or args.deepspeed:  # the fp16 GradScaler skips overflowing steps itself; DeepSpeed: see above
            return
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        finite = (torch.stack([g.isfinite().all() for g in grads]).all() if grads
                  else torch.ones((), dtype=torch.bool, device=next(model.parameters()).device))
        if _all_ranks_agree(finite):  # one host sync per step
            return
        step = state.global_step + 1
        if self.policy == "skip-step":
            for p in model.parameters():
                p.grad = None
            self.skipped.append(step)
            log.warning("step %d: non-finite gradients; step skipped (--nan-policy skip-step)", step)
            return
        self._stop(step, "the loss or gradients are")

    def check_loss(self, loss: torch.Tensor, global_step: int) -> None:
        """Stop before backward when any process's training loss is NaN/inf (all processes decide together)."""
        if not _all_ranks_agree(loss.detach().isfinite().all()):
            self._stop(global_step + 1, "the loss is", skip_hint=False)

    def _stop(self, step: int, what: str, skip_hint: bool = True) -> None:
        good = newest_complete_checkpoint(self.checkpoints)
        raise NonFiniteError(
            f"step {step}: {what} not finite (NaN/inf); stopped before updating the weights. "
            + (f"The last good checkpoint is {good}. " if good else "")
            + "Lower --lr, check the data" + (", or pass --nan-policy skip-step to skip such steps" if skip_hint
                                              else ""))


def _all_ranks_agree(ok: torch.Tensor) -> bool:
    """True when ``ok`` holds on every process (each may see only its own batch, or a shard of the gradients)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ok = ok.to(torch.int32)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)
