"""``elmtune train --dry-run``: what a run would do, computed without allocating a single weight."""

from __future__ import annotations

import math
import os

import torch

from ..data import DataSpec
from ..models.loading import build_on_meta, load_config
from ..tokenizer import load_tokenizer
from .args import TrainOptions

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def estimate_memory(config, n_params: int, n_trainable: int, tokens_per_micro_batch: int, precision: str,
                    checkpointing: bool) -> dict:
    """A rough per-device estimate in bytes: frozen weights, LoRA weights + grads + AdamW states, activations."""
    width = BYTES[precision]
    d, layers = config.model_dim, config.num_transformer_layers
    widest_ffn = max(config.ffn_dim(i) for i in range(layers))
    per_layer = tokens_per_micro_batch * (6 * d + 3 * widest_ffn) * width  # what one layer keeps for backward
    activations = (tokens_per_micro_batch * d * width * layers + per_layer) if checkpointing else per_layer * layers
    logits = tokens_per_micro_batch * config.vocab_size * 4 * 2  # fp32 logits and their gradient
    parts = {"weights": n_params * width, "lora_and_optimizer": n_trainable * 16, "activations": activations + logits}
    parts["total"] = sum(parts.values())
    return parts


def available_memory() -> int:
    """Bytes the run can use: free GPU memory, else the system's available RAM."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def decide_checkpointing(options: TrainOptions, config, n_params: int, n_trainable: int, longest: int,
                         precision: str) -> tuple[bool, str]:
    """``--gradient-checkpointing`` on/off as asked; ``auto``: on only if the run would not fit without it."""
    if options.gradient_checkpointing != "auto":
        return options.gradient_checkpointing == "on", "as asked"
    tokens = options.batch_size * longest
    need = estimate_memory(config, n_params, n_trainable, tokens, precision, checkpointing=False)["total"]
    have = available_memory()
    on = need > 0.7 * have
    return on, f"auto: ~{need / 2**30:.1f} GiB needed without it, {have / 2**30:.1f} GiB available"


def plan_run(options: TrainOptions) -> dict:
    from peft import LoraConfig, get_peft_model

    from .recipe import default_tokenizer, load_data, resolve_precision

    config = load_config(options.model)
    tokenizer = load_tokenizer(default_tokenizer(options))
    spec = DataSpec.parse(options.template, options.fields, options.max_length)
    train_examples, eval_examples, stats = load_data(options, tokenizer, spec)
    model = build_on_meta(config)
    lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=list(options.lora_targets), use_dora=options.use_dora, use_rslora=options.use_rslora)
    trainable, total = get_peft_model(model, lora).get_nb_trainable_parameters()
    assert all(p.device.type == "meta" for p in model.parameters())
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    micro_batches = math.ceil(len(train_examples) / (options.batch_size * world))
    steps_per_epoch = max(1, math.ceil(micro_batches / options.grad_accum))
    steps = options.max_steps if options.max_steps > 0 else math.ceil(steps_per_epoch * options.epochs)
    lengths = sorted(len(e.input_ids) for e in train_examples)
    precision = resolve_precision(options.precision)
    checkpointing, why = decide_checkpointing(options, config, total - trainable, trainable, lengths[-1], precision)
    memory = estimate_memory(config, total - trainable, trainable, options.batch_size * lengths[-1], precision,
                             checkpointing)
    return {
        "model": options.model, "precision": precision,
        "parameters_total": total, "parameters_trainable": trainable,
        "trainable_share": round(trainable / total, 6),
        "data": stats.summary(), "train_examples": len(train_examples), "eval_examples": len(eval_examples),
        "longest_example": lengths[-1], "median_example": lengths[len(lengths) // 2],
        "global_batch": options.batch_size * options.grad_accum * world,
        "steps_per_epoch": steps_per_epoch, "total_steps": steps,
        "gradient_checkpointing": f"{'on' if checkpointing else 'off'} ({why})",
        "estimated_memory_gib": {k: round(v / 2**30, 2) for k, v in memory.items()},
    }
