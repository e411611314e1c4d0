"""``elmtune train --dry-run``: what a run would do, computed without allocating a single weight."""

from __future__ import annotations

import math
import os

import torch

from ..device import resolve_precision
from ..models.loading import build_on_meta
from .args import PREFERENCE_METHODS, TrainOptions
from .checkpointing import selective_unsupported

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def layer_parameters(config, i: int) -> int:
    """Parameters of decoder layer ``i`` (attention, q/k norms, feed-forward, the two norms), from the config."""
    d, h = config.model_dim, config.head_dim
    q, kv, ffn = config.num_query_heads[i], config.num_kv_heads[i], config.ffn_dim(i)
    qk_norms = 2 * h if config.normalize_qk_projections else 0
    return d * (q + 2 * kv) * h + q * h * d + qk_norms + d * ffn * (2 if config.ffn_with_glu else 1) + ffn * d + 2 * d


def outer_parameters(config) -> int:
    """Parameters outside the decoder layers: the token embedding (also the head when shared), the final norm."""
    d = config.model_dim
    return config.vocab_size * d * (1 if config.share_input_output_layers else 2) + d


def estimate_memory(config, n_params: int, n_trainable: int, tokens_per_micro_batch: int, precision: str,
                    checkpointing: str, full: bool = False, shards: int = 1) -> dict:
    """A rough per-device estimate in bytes: frozen weights, trainable weights + grads + AdamW states, activations.

    The trainable weights (LoRA's, or with ``full`` the model's own) are fp32 with fp32 gradients and two fp32
    AdamW moments: 16 bytes each.  Under ``full`` the frozen weights are fp32 too (the whole model is loaded in
    fp32, see :mod:`elmtune.training.full`), and with 16-bit precision autocast keeps a 16-bit copy of every weight
    a matmul used until backward (2 bytes per parameter).

    ``checkpointing`` is the mode (off, on, full; see :mod:`elmtune.training.checkpointing`): what every layer keeps
    until backward, plus one layer's full activations (the layer being recomputed, or the last one).

    ``shards`` > 1 is FSDP over that many processes (:func:`memory_shards`): the weights, gradients and AdamW
    states are divided among them, and each process gathers whole units only while it computes them, in the
    compute dtype (the MixedPrecisionPolicy's param_dtype; so no autocast copies): the outer unit (embedding /
    head, final norm) for the whole step and a decoder layer with the next one prefetched; in backward the
    unsharded gradients of the outer unit and one layer, in that dtype and as the fp32 copy reduce-scattered
    (``gathered``).  Activations and logits are per process whatever the sharding.  DDP keeps everything on
    every device; DeepSpeed ZeRO-2 is counted like DDP (an upper bound: it shards gradients and AdamW states).
    """
    width = BYTES[precision]
    d, layers = config.model_dim, config.num_transformer_layers
    widest_ffn = max(config.ffn_dim(i) for i in range(layers))
    # What one layer keeps for backward; attention's inputs and output counted in fp32 (as on CPU, see openelm.py).
    attention = config.head_dim * max(2 * q + 2 * kv for q, kv in zip(config.num_query_heads, config.num_kv_heads))
    per_layer = tokens_per_micro_batch * ((6 * d + 3 * widest_ffn) * width + 4 * attention)
    if checkpointing == "off":
        activations = per_layer * layers
    elif checkpointing == "on":  # the layer input, qkv, out_proj and proj_2 outputs; attention output + lse (fp32)
        kept = sum((config.head_dim * (q + 2 * kv) + 3 * d) * width + (config.head_dim + 1) * q * 4
                   for q, kv in zip(config.num_query_heads, config.num_kv_heads))
        activations = tokens_per_micro_batch * kept + per_layer
    else:  # full: the layer inputs only
        activations = tokens_per_micro_batch * d * width * layers + per_layer
    logits = tokens_per_micro_batch * config.vocab_size * 4 * 2  # fp32 logits and their gradient
    parts = {"weights": -(-n_params * (4 if full else width) // shards),
             "trainable_grads_adamw": -(-n_trainable * 16 // shards), "activations": activations + logits}
    if shards > 1:
        outer, layer = outer_parameters(config), max(layer_parameters(config, i) for i in range(layers))
        trained_share = n_trainable / max(1, n_params + n_trainable)
        parts["gathered"] = (outer + 2 * layer) * width + math.ceil((outer + layer) * (width + 4) * trained_share)
    elif full and precision != "fp32":
        parts["autocast_copies"] = (n_params + n_trainable) * width
    parts["total"] = sum(parts.values())
    return parts


def estimate_disk(n_trainable: int, total_steps: int, save_steps: int, save_total_limit: int | None,
                  done_steps: int = 0, n_saved: int | None = None) -> tuple[int, str]:
    """Bytes the rest of a run writes to its output directory at most, and how that adds up.

    A checkpoint holds the saved weights (fp32: the LoRA weights, or with ``n_saved`` = all parameters the whole
    model of a full fine-tune) and AdamW's two moments (fp32) of the trainable ones: 4 bytes per saved and 8 per
    trainable parameter, plus a few small files.  With ``--save-total-limit K`` at most K + 1 exist at once (the
    new one is complete before the oldest is removed); without it every remaining save stays.  The final output
    adds 4 bytes per saved parameter and the tokenizer.
    """
    n_saved = n_trainable if n_saved is None else n_saved
    slack = 2 << 20
    checkpoint = 4 * n_saved + 8 * n_trainable + slack
    saves = max(0, total_steps // save_steps - done_steps // save_steps)
    if save_total_limit:
        saves = min(saves, save_total_limit + 1)
    final = 4 * n_saved + slack
    what = "the adapter" if n_saved == n_trainable else "the model"
    return saves * checkpoint + final, f"{saves} checkpoint(s) of ~{checkpoint / 2**20:,.1f} MiB + {what}"


def world() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun / accelerate launch; (0, 1) when run alone."""
    return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))


def memory_shards(options: TrainOptions) -> int:
    """Processes the weights, gradients and optimizer states are divided among: the world size under
    ``--distributed fsdp``, else 1 (DDP: every process holds them all)."""
    return world()[1] if options.distributed == "fsdp" else 1


def memory_layout(options: TrainOptions) -> str:
    """The plan's line on how the memory estimate is divided among processes."""
    size = world()[1]
    if size == 1:
        return "one process: the estimate is this device's"
    if memory_shards(options) > 1:
        return (f"sharded over {size} processes (FSDP): each holds 1/{size} of the weights, gradients and AdamW "
                "states, gathers the outer unit and two decoder layers at a time, and its own activations; the "
                "estimate is per device")
    engine = "DeepSpeed ZeRO-2, counted as DDP (an upper bound)" if options.distributed == "deepspeed" else "DDP"
    return f"{size} processes ({engine}): each device holds the whole estimate"


def lora_config(options: TrainOptions, **extra):
    """The PEFT LoRA config of a run (one definition for the counted and the trained model)."""
    from peft import LoraConfig

    return LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=list(options.lora_targets), use_dora=options.method == "dora",
                      use_rslora=options.use_rslora, **extra)


def count_steps(options: TrainOptions, n_examples: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) the Trainer will run for ``n_examples``."""
    micro_batches = math.ceil(n_examples / (options.batch_size * world()[1]))
    steps_per_epoch = max(1, math.ceil(micro_batches / options.grad_accum))
    return steps_per_epoch, options.max_steps if options.max_steps > 0 else math.ceil(steps_per_epoch * options.epochs)


def available_memory(device: torch.device | None = None) -> int:
    """Bytes the run can use on ``device``: that GPU's free memory, else the system's available RAM.

    Under torchrun every process reads its own GPU, and the processes then agree on the smallest figure (see
    :func:`least_across_processes`), so that they all choose the same checkpointing mode.
    """
    if device is not None and device.type == "cuda":
        return least_across_processes(torch.cuda.mem_get_info(device)[0], device)
    return least_across_processes(_host_memory(), device)


def least_across_processes(value: int, device: torch.device | None = None) -> int:
    """The minimum of ``value`` over all processes of the run (just ``value`` when run alone)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    # NCCL reduces CUDA tensors only; gloo takes CPU ones
    on = device if device is not None and torch.distributed.get_backend() == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.int64, device=on)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return int(tensor.item())


def _host_memory() -> int:
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def decide_checkpointing(options: TrainOptions, config, n_params: int, n_trainable: int, longest: int,
                         precision: str, device: torch.device | None = None) -> tuple[str, str]:
    """The checkpointing mode (off, on, full) and why: as asked, or for ``auto`` the first of off → on → full
    whose memory estimate fits in 70% of the memory available."""
    unsupported = selective_unsupported(options.quantize, options.distributed, world()[1], options.method, precision)
    if options.gradient_checkpointing == "on" and unsupported:
        return "full", f"selective asked, but {unsupported}"
    if options.gradient_checkpointing != "auto":
        return options.gradient_checkpointing, "as asked"
    tokens = options.batch_size * longest
    have = available_memory(device)
    candidates = ("off",) if unsupported else ("off", "on")
    needs = {mode: estimate_memory(config, n_params, n_trainable, tokens, precision, mode,
                                   options.method == "full", memory_shards(options))["total"]
             for mode in candidates}
    mode = next((m for m in candidates if needs[m] <= 0.7 * have), "full")
    selective = f"~{needs['on'] / 2**30:.1f} GiB selective" if "on" in needs else f"no selective: {unsupported}"
    return mode, (f"auto: ~{needs['off'] / 2**30:.1f} GiB needed without it, {selective}, "
                  f"{have / 2**30:.1f} GiB available")


def count_parameters(config, options: TrainOptions) -> tuple[int, int]:
    """(trainable, total) parameters of the LoRA model — or under ``--method full`` of the model itself, those
    ``--trainable`` selects — counted on the meta device (nothing allocated)."""
    from peft import get_peft_model

    from .full import set_trainable

    model = build_on_meta(config)
    if options.method == "full":
        counts = set_trainable(model, options.trainable)
    else:
        counts = get_peft_model(model, lora_config(options)).get_nb_trainable_parameters()
    assert all(p.device.type == "meta" for p in model.parameters())
    return counts


def memory_fits(need: int, device: torch.device, remedies: str) -> str:
    """Whether ``need`` bytes fit the 70% of the device's available memory a plan allows itself, said in words."""
    available = available_memory(device)
    if need <= 0.7 * available:
        return f"yes: ~{need / 2**30:.1f} GiB of {available / 2**30:.1f} GiB available"
    return (f"NO: ~{need / 2**30:.1f} GiB needed, {available / 2**30:.1f} GiB available here (70% is planned for); "
            f"use a larger device, {remedies}")


def plan_run(options: TrainOptions) -> dict:
    if options.method in PREFERENCE_METHODS:  # DPO / ORPO: pairs, and the reference model's memory
        from .preference import plan_preference

        return plan_preference(options)
    from ..device import describe
    from .recipe import DTYPE_OF, load_data, prepare

    p = prepare(options, load_data)
    device, config, stats, train_examples, eval_examples = p.device, p.config, p.stats, p.train, p.eval
    trainable, total = count_parameters(config, options)
    steps_per_epoch, steps = count_steps(options, len(train_examples))
    full = options.method == "full"
    disk, _ = estimate_disk(trainable, steps, options.save_steps, options.save_total_limit,
                            n_saved=total if full else None)
    lengths = sorted(len(e.input_ids) for e in train_examples)
    precision = resolve_precision(options.precision, device)
    checkpointing, why = decide_checkpointing(options, config, total - trainable, trainable, lengths[-1], precision,
                                              device)
    memory = estimate_memory(config, total - trainable, trainable, options.batch_size * lengths[-1], precision,
                             checkpointing, full, memory_shards(options))
    return {
        "model": options.model, "method": options.method,
        "device": describe(device, DTYPE_OF[precision]), "precision": precision,
        "parameters_total": total, "parameters_trainable": trainable,
        "trainable_share": round(trainable / total, 6),
        "data": stats.summary(), "train_examples": len(train_examples), "eval_examples": len(eval_examples),
        "longest_example": lengths[-1], "median_example": lengths[len(lengths) // 2],
        "global_batch": options.batch_size * options.grad_accum * world()[1],
        "steps_per_epoch": steps_per_epoch, "total_steps": steps,
        "gradient_checkpointing": f"{checkpointing} ({why})",
        "estimated_memory_gib": {k: round(v / 2**30, 2) for k, v in memory.items()},
        "memory_layout": memory_layout(options),
        "memory_fits": memory_fits(memory["total"], device, "FSDP/DeepSpeed across GPUs, a smaller --batch-size or "
                                   "--max-length" + ("" if full else ", or --quantize 4bit")),
        "estimated_disk_gib": round(disk / 2**30, 3),
    }
