"""Runs that lose nothing: verified checkpoints, a graceful stop on SIGINT/SIGTERM, one writer per directory."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import signal
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger("elmtune")
MANIFEST = "elmtune-manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Record every file of a finished checkpoint with its checksum; written last, atomically (tmp + rename)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(checkpoint.iterdir()) if p.is_file() and p.name != MANIFEST}
    tmp = checkpoint / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
    os.replace(tmp, checkpoint / MANIFEST)


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


class ManifestCallback(TrainerCallback):
    """After the Trainer writes ``checkpoint-N``, seal it with a manifest (rank 0)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")


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
    """

    def __init__(self, policy: str, checkpoints: Path):
        self.policy, self.checkpoints = policy, checkpoints
        self.skipped: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if all(bool(g.isfinite().all()) for g in grads):
            return
        step = state.global_step + 1
        if self.policy == "skip-step":
            for p in model.parameters():
                p.grad = None
            self.skipped.append(step)
            log.warning("step %d: non-finite gradients; step skipped (--nan-policy skip-step)", step)
            return
        good = newest_complete_checkpoint(self.checkpoints)
        raise NonFiniteError(
            f"step {step}: the loss or gradients are not finite (NaN/inf); stopped before updating the weights. "
            + (f"The last good checkpoint is {good}. " if good else "")
            + "Lower --lr, check the data, or pass --nan-policy skip-step to skip such steps")
