"""Batching examples for training: padding-free packing (default) or the tutorial's padded batches."""

from __future__ import annotations

import torch

from .encode import IGNORE_INDEX


class PackedCollator:
    """All examples of a micro-batch concatenated into one row, without padding.

    ``position_ids`` restart at 0 for each example, which the model reads as a document boundary: attention
    stays inside each example, so every token sees exactly what it would see alone.  Each example's first label
    is -100 (it is the bos / prompt anyway), so the causal shift never asks one example to predict the next.
    The micro-batch holds the same examples as a padded one would: packing changes speed, never results.
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions = [], [], []
        for f in features:
            n = len(f["input_ids"])
            input_ids += f["input_ids"]
            labels += [IGNORE_INDEX] + list(f["labels"][1:n])
            positions += range(n)
        return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}
