"""LoRA fine-tuning: options, the recipe (setup → train → finish) and its dry-run plan."""

from .args import DataOptions, TrainOptions
from .recipe import TrainError, finish, setup, train

__all__ = ["DataOptions", "TrainOptions", "TrainError", "finish", "setup", "train"]
