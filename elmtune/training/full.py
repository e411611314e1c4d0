"""``--method full``: training the model's own weights, chosen with ``--trainable`` patterns.

Precision: the weights are held in fp32 (the master copy the optimizer updates) and the forward/backward runs
under the Trainer's bf16/fp16 autocast — what ``TrainingArguments(bf16=True)`` does with an fp32 model.  Updating
bf16 weights directly would lose every update smaller than 2^-8 of a weight (lr 1e-5 × Adam's unit step is far
below that), so the model would stop learning; fp32 master weights cost 4 bytes per parameter instead of 2, plus
the 16-bit copies autocast makes for each matmul.

The output is a complete checkpoint in Apple's layout (:func:`elmtune.merge.save_apple_checkpoint`), written in
fp32 like Apple's own checkpoints.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn


class TrainableError(ValueError):
    """``--trainable`` patterns that select nothing, or match no parameter."""


def trainable_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the parameters ``patterns`` select, in ``model.named_parameters()`` order.

    Each pattern is matched with :func:`fnmatch.fnmatchcase` against the full parameter name (as
    ``named_parameters()`` gives it: ``transformer.layers.0.attn.qkv_proj.weight``; a tied weight under its first
    name, ``transformer.token_embeddings.weight``).  Patterns starting with ``!`` freeze what they match; without
    any other pattern, everything else trains.  A pattern that matches no parameter is an error (a typo would
    otherwise silently train, or freeze, nothing).
    """
    names = [name for name, _ in model.named_parameters()]
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    for pattern in include + exclude:
        if not any(fnmatchcase(name, pattern) for name in names):
            examples = ", ".join(names[:3] + ["…"] + names[-2:]) if len(names) > 5 else ", ".join(names)
            raise TrainableError(f"--trainable {pattern!r} matches no parameter (names look like: {examples})")
    chosen = [name for name in names
              if (not include or any(fnmatchcase(name, p) for p in include))
              and not any(fnmatchcase(name, p) for p in exclude)]
    if not chosen:
        raise TrainableError(f"--trainable {' '.join(patterns)}: every parameter would be frozen")
    return chosen


def set_trainable(model: nn.Module, patterns: list[str]) -> tuple[int, int]:
    """Make exactly the parameters ``patterns`` select trainable; returns (trainable, total) parameter counts."""
    chosen = set(trainable_names(model, patterns))
    trainable = total = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
        total += parameter.numel()
        trainable += parameter.numel() if name in chosen else 0
    return trainable, total
