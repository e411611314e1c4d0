"""Trainer callbacks: a metrics JSONL file, a progress bar with loss / lr / tokens/s / ETA, and the loss plot."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback


class MetricsCallback(TrainerCallback):
    """Appends every log (training and evaluation) to ``metrics.jsonl``, with eval perplexity and tokens/s."""

    def __init__(self, path: Path):
        self.path = path
        self._last: tuple[float, int] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": round(time.time(), 3)}
        entry.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if "eval_loss" in logs:
            entry["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        if "loss" in logs:
            now, tokens = time.time(), state.num_input_tokens_seen
            if self._last is not None and now > self._last[0]:
                entry["tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 1)
            self._last = (now, tokens)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class ProgressCallback(TrainerCallback):
    """One tqdm bar over optimizer steps (tqdm gives the ETA), with the latest loss, lr and tokens/s."""

    def __init__(self):
        self.bar = None
        self._start: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True, mininterval=0.5)
            self._start = (time.time(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        postfix = {}
        if "loss" in logs:
            postfix["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            postfix["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        elapsed = time.time() - self._start[0]
        if elapsed > 0:
            postfix["tok/s"] = f"{(state.num_input_tokens_seen - self._start[1]) / elapsed:.0f}"
        self.bar.set_postfix(postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """End the bar (also when training failed: an error message must not be followed by a stale bar)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """Training (and evaluation) loss against step, from ``metrics.jsonl``; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return False
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="evaluation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True


def plot_rewards(metrics_path: Path, png_path: Path) -> bool:
    """Preference runs (DPO, ORPO): reward accuracy and margin against step, training and evaluation, from
    ``metrics.jsonl`` (TRL's ``rewards/accuracies`` and ``rewards/margins``); False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return False
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    series = {(prefix, key): [(r["step"], r[prefix + "rewards/" + key]) for r in rows if prefix + "rewards/" + key in r]
              for prefix in ("", "eval_") for key in ("accuracies", "margins")}
    if not any(series.values()):
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True)
    for (prefix, key), points in series.items():
        if points:
            axis = top if key == "accuracies" else bottom
            axis.plot(*zip(*points), "o-" if prefix else "-", label="evaluation" if prefix else "training")
    top.set_ylabel("reward accuracy (chosen > rejected)")
    top.set_ylim(-0.02, 1.02)
    bottom.set_ylabel("reward margin (chosen − rejected)")
    bottom.set_xlabel("optimizer step")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True
