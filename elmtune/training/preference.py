"""Preference tuning, ``elmtune train --method dpo|orpo``, on TRL's trainers.

The records (``prompt`` or ``messages``, ``chosen``, ``rejected``; see :mod:`elmtune.data.preference`) are
tokenized by elmtune exactly as supervised training tokenizes prompts and answers, and handed to TRL already
tokenized (``prompt_ids``, ``chosen_ids``, ``rejected_ids``): TRL's own text tokenization is bypassed, so bos, eos
and the template's control tokens are where training and inference put them.  The loss, the reference
log-probabilities and the reward metrics are TRL's:

* ``dpo`` — :class:`trl.DPOTrainer` (sigmoid loss, ``--beta`` = β).  The reference is the starting point:
  with ``--tune lora``/``dora`` the base with the adapter disabled (no second copy), or with ``--init-adapter``
  the base plus a frozen copy of that adapter (TRL's ``ref`` adapter, a few MB); with ``--tune full`` a second,
  frozen copy of the model, in the training precision;
* ``orpo`` — :class:`trl.experimental.orpo.ORPOTrainer` (no reference model; ``--beta`` = λ, the weight of the
  odds-ratio term added to the chosen answers' NLL).

Batches are padded (TRL's preference collators, right padding with pad = eos): TRL's padding-free DPO is disabled
in TRL 1.x, so ``--packing`` does not apply.  Everything else is the supervised recipe's: output directory, lock,
resume, atomic checkpoints, the NaN guard, graceful stop, metrics and plots, ``elmtune.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from ..data import DataSpec
from ..data.preference import load_pairs
from ..device import resolve_precision
from .args import PREFERENCE_METHODS, TrainOptions
from .callbacks import MetricsCallback, ProgressCallback, plot_losses, plot_rewards
from .checkpointing import checkpointing_mode, enable_checkpointing
from .plan import (count_parameters, count_steps, decide_checkpointing, estimate_disk, estimate_memory,
                   memory_fits, world)
from .safety import AtomicCheckpointTrainer, GracefulStop, NonFiniteGuard, save_atomically

log = logging.getLogger("elmtune")
TRL_MINIMUM = "1.0"


def require_trl(method: str) -> None:
    """TRL is an optional dependency: without it, one line saying what to install."""
    from .recipe import TrainError

    try:
        import trl  # noqa: F401
    except ImportError:
        raise TrainError(f"--method {method} needs TRL: pip install 'elmtune[preference]'") from None


def supervised_view(options: TrainOptions) -> TrainOptions:
    """The options as the supervised recipe's helpers read them: ``--method`` = what is trained (``--tune``)."""
    return dataclasses.replace(options, method=options.tune, tune="lora", init_adapter=None)


# ----------------------------------------------------------------------------------------------- data


def load_preference_data(options: TrainOptions, tokenizer, spec: DataSpec):
    from .recipe import load_data

    return load_data(options, tokenizer, spec, load_pairs, "preference pairs",
                     "dropped: the prompt alone fills --max-length")


def _dataset(pairs):
    from datasets import Dataset

    return Dataset.from_list([p.features() for p in pairs])


# ----------------------------------------------------------------------------------------------- models


class _TiedHead:
    """What TRL's fused log-probability head reads as the output layer (``.weight``, ``.bias``) of a model whose
    head is its token embedding (Apple's tied checkpoints have no ``lm_head``): the model's own
    :meth:`~elmtune.models.openelm.OpenELMForCausalLM.output_weight`, looked up at every call."""

    bias = None

    def __init__(self, model):
        self._model = model

    @property
    def weight(self) -> torch.Tensor:
        return self._model.output_weight()


def expose_tied_head(model) -> None:
    """Give a tied OpenELM (under PEFT or not) an output layer TRL's fused head can read (see :class:`_TiedHead`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "lm_head", None) is None and hasattr(base, "output_weight"):
        head = _TiedHead(base)
        base.get_output_embeddings = lambda: head


def same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def load_init_adapter(options: TrainOptions, dtype: torch.dtype, checkpointing: str,
                      device: torch.device | None = None):
    """``--init-adapter DIR``: the base with that adapter, trainable (its own rank, targets and weights)."""
    from peft import PeftModel

    from ..models.loading import load_model
    from .dropout import use_fast_dropout
    from .fused_lora import use_fused_lora
    from .recipe import METADATA_FILE, TrainError

    path = Path(options.init_adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise TrainError(f"--init-adapter {path}: no adapter_config.json here (expected an `elmtune train` output "
                         "directory or a PEFT adapter)")
    meta_path = path / METADATA_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    recorded = meta.get("base_model") or json.loads((path / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    if recorded and not same_model(recorded, options.model):
        raise TrainError(f"--init-adapter {path} was trained on {recorded}, not on --model {options.model}; give "
                         "the adapter's own base model")
    if options.quantize != "none":
        raise TrainError(f"--quantize {options.quantize} cannot be combined with --init-adapter (the adapter is "
                         "loaded on the unquantized base); drop one of them")
    trained_with = meta.get("template", {}).get("format")
    rendering = DataSpec.from_options(options).template.format
    if trained_with is not None and trained_with != rendering:
        log.warning("--init-adapter %s was trained with the prompt template %r, and this run renders prompt strings "
                    "with %r: pass --template to keep the adapter's, unless the change is meant", path, trained_with,
                    rendering)
    on = device if device is not None and device.type != "cpu" else None
    model = load_model(options.model, dtype=dtype, seed=options.seed, device=on,
                       attn_implementation=options.attn_implementation)
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
    if options.fast_lora_dropout:
        use_fast_dropout(peft_model)
    if options.fused_lora:
        use_fused_lora(peft_model)
    if dtype != torch.float32:  # as build_peft_model: autocast casts the LoRA matmuls anyway
        for module in peft_model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    enable_checkpointing(peft_model, checkpointing)
    return peft_model


def build_policy(options: TrainOptions, dtype: torch.dtype, checkpointing: str, device: torch.device | None = None):
    """The model preference tuning trains: a new LoRA/DoRA adapter, the ``--init-adapter`` one, or (``--tune full``)
    the model itself; computing full logits wherever it is asked for them (TRL calls it without our labels)."""
    from .recipe import build_model

    if options.init_adapter:
        model = load_init_adapter(options, dtype, checkpointing, device)
    else:
        model = build_model(supervised_view(options), dtype, checkpointing, device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.supervised_logits_only = False
    return model


def build_reference(options: TrainOptions, dtype: torch.dtype, device: torch.device | None = None):
    """DPO's reference for ``--tune full``: a second, frozen copy of the model, in the training precision."""
    from ..models.loading import load_model

    on = device if device is not None and device.type != "cpu" else None
    reference = load_model(options.model, dtype=dtype, seed=options.seed, device=on,
                           attn_implementation=options.attn_implementation)
    reference.requires_grad_(False)
    return reference.eval()


# ----------------------------------------------------------------------------------------------- trainers


def freeze_reference_copy(peft_model) -> None:
    """Make TRL's ``ref`` adapter an exact, frozen copy of the starting (``default``) adapter.

    TRL copies the parameters whose names contain ``.default.``; an adapted embedding's are named
    ``…lora_embedding_A.default`` (no dot after it), so the reference would keep a fresh embedding adapter (zero:
    the base embedding) instead of the one it was given.  Every ``ref`` parameter is copied here by its name parts.
    """
    parameters = dict(peft_model.named_parameters())
    for name, parameter in parameters.items():
        parts = name.split(".")
        if "ref" in parts:
            source = ".".join("default" if part == "ref" else part for part in parts)
            with torch.no_grad():
                parameter.copy_(parameters[source])
            parameter.requires_grad_(False)


def _restore_checkpointing(trainer) -> None:
    """TRL turns checkpointing off around the reference forward and back on with transformers' default policy;
    put elmtune's mode (``on`` is selective) back before the next forward pass."""
    if trainer.checkpointing != "off" and checkpointing_mode(trainer.model) != trainer.checkpointing:
        enable_checkpointing(trainer.model, trainer.checkpointing)


def dpo_trainer_class():
    from trl import DPOTrainer

    class ElmtuneDPOTrainer(AtomicCheckpointTrainer, DPOTrainer):
        """TRL's DPOTrainer with elmtune's atomic checkpoints, fed pairs elmtune has tokenized."""

        checkpointing = "off"

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # prompt_ids / chosen_ids / rejected_ids already, cut to --max-length

        def _compute_loss(self, model, inputs, return_outputs):
            try:
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                _restore_checkpointing(self)

        def create_model_card(self, *args, **kwargs):
            pass  # elmtune.json describes the run

    return ElmtuneDPOTrainer


def orpo_trainer_class():
    from trl.experimental.orpo import ORPOTrainer

    class ElmtuneORPOTrainer(AtomicCheckpointTrainer, ORPOTrainer):
        """TRL's ORPOTrainer with elmtune's atomic checkpoints, fed pairs elmtune has tokenized."""

        checkpointing = "off"

        def tokenize_row(self, feature, model=None) -> dict:
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for name in ("chosen", "rejected"):
                answer = list(feature[f"{name}_ids"])
                row[f"{name}_input_ids"] = prompt + answer
                row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{name}_labels"] = [-100] * len(prompt) + answer
            return row

        def create_model_card(self, *args, **kwargs):
            pass

    return ElmtuneORPOTrainer


def trainer_config(options: TrainOptions) -> tuple[type, dict]:
    """TRL's config class for the method and the fields elmtune sets on it (beyond the supervised recipe's)."""
    common = dict(max_length=options.max_length, beta=options.beta, disable_dropout=True,
                  gradient_checkpointing=False,  # elmtune sets the model's own mode (selective or full)
                  include_num_input_tokens_seen="non_padding")  # padded batches: count real tokens
    if options.method == "dpo":
        from trl import DPOConfig

        return DPOConfig, {**common, "precompute_ref_log_probs": False, "loss_type": ["sigmoid"]}
    from trl.experimental.orpo import ORPOConfig

    # ORPO's batches hold chosen_/rejected_input_ids, no input_ids: the Trainer cannot count tokens there
    return ORPOConfig, {**common, "include_num_input_tokens_seen": "no"}


# ----------------------------------------------------------------------------------------------- setup / finish


def reference_of(options: TrainOptions) -> str:
    """What DPO compares the policy with, in words."""
    if options.method == "orpo":
        return "none (ORPO has no reference model)"
    if options.tune == "full":
        return "a frozen copy of the model"
    if options.init_adapter:
        return "the base with the --init-adapter adapter, frozen"
    return "the base with the adapter disabled"


def preference_metadata(options: TrainOptions, spec: DataSpec, stats, tokenizer) -> dict:
    """``elmtune.json`` of a preference run: as a supervised run's, with the formats named by how their prompts
    are rendered (a ``prompt`` string as an alpaca instruction, ``messages`` with the chat template), so that
    inference renders prompts as training did; plus the preference settings."""
    from .recipe import metadata

    meta = metadata(options, spec, stats, tokenizer)
    formats = {name: s.records for name, s in stats.formats.items()}
    meta["formats"] = {k: v for k, v in {"alpaca": formats.get("preference", 0),
                                          "messages": formats.get("preference-chat", 0)}.items() if v}
    meta["preference"] = {"method": options.method, "tune": options.tune, "beta": options.beta,
                          "init_adapter": options.init_adapter, "reference": reference_of(options)}
    return meta


def setup_preference(options: TrainOptions, callbacks: list[TrainerCallback] | tuple = ()):
    """Check what can be checked before loading weights, then build the TRL trainer: a :class:`~.recipe.Run`."""
    from .recipe import setup

    require_trl(options.method)
    return setup(options, callbacks, _build_run)


def _build_run(options: TrainOptions, out: Path, lock, callbacks):
    from .recipe import (DTYPE_OF, ReleaseFreedMemory, check_disk, settle_measured_choices, start_run,
                         tensorboard_callback, training_arguments)

    run, device, config = start_run(options, out, lock, load_preference_data, preference_metadata)
    tokenizer, train_pairs, eval_pairs, resume_from = run.tokenizer, run.train_examples, run.eval_examples, \
        run.resume_from
    base = supervised_view(options)
    precision = resolve_precision(options.precision, device)
    dtype = DTYPE_OF[precision]
    trainable, total = count_parameters(config, base)
    if world()[0] == 0:
        check_disk(base, out, trainable, len(train_pairs), resume_from, total)
    cls, extra = trainer_config(options)
    args = training_arguments(options, out, precision, bool(eval_pairs), device, cls, **extra)
    longest = max(p.longest for p in train_pairs)
    # chosen and rejected of each pair go through the model together: twice the rows of a supervised batch
    checkpointing, why = decide_checkpointing(base, config, total - trainable, trainable, 2 * longest, precision,
                                              device)
    model = build_policy(options, dtype, checkpointing, device)
    # chosen and rejected are a row each: the rows' length is the pair's longest
    checkpointing, why = settle_measured_choices(model, config, checkpointing, why,
                                                 [p.longest for p in train_pairs], dtype, device)
    log.info("gradient checkpointing %s (%s)", checkpointing, why)
    reference = build_reference(options, dtype, device) if options.method == "dpo" and options.tune == "full" else None
    if options.method == "dpo":
        expose_tied_head(model)
        if reference is not None:
            expose_tied_head(reference)
    run.stop = GracefulStop()
    guard = NonFiniteGuard(options.nan_policy, out / "checkpoints")
    kwargs = dict(model=model, args=args, train_dataset=_dataset(train_pairs),
                  eval_dataset=_dataset(eval_pairs) if eval_pairs else None, processing_class=tokenizer.hf,
                  callbacks=[MetricsCallback(out / "metrics.jsonl"), ProgressCallback(),
                             *([ReleaseFreedMemory()] if device.type == "cpu" else []), guard, run.stop,
                             *([tensorboard_callback(out)] if options.tensorboard else []), *callbacks])
    if options.method == "dpo":
        tokenizer.hf.padding_side = "right"
        run.trainer = dpo_trainer_class()(ref_model=reference, **kwargs)
        peft_model = run.trainer.model
        if hasattr(peft_model, "peft_config") and "ref" in peft_model.peft_config:
            if options.init_adapter:  # the reference: the starting adapter, frozen
                freeze_reference_copy(peft_model)
            else:  # a new adapter starts as the base itself: disabling it is the reference, no copy needed
                peft_model.delete_adapter("ref")
    else:
        run.trainer = orpo_trainer_class()(**kwargs)
    run.trainer.checkpointing = checkpointing
    if run.trainer.is_deepspeed_enabled:
        run.trainer.loss_guard = guard
    run.trainer.remove_callback(PrinterCallback)
    return run


def finish_preference(run) -> dict:
    """Final evaluation, the adapter (or model), tokenizer and plots; returns the run's summary."""
    from .recipe import METADATA_FILE, save_full_model

    trainer, out, options = run.trainer, run.output_dir, run.options
    summary = {"output_dir": str(out), "method": options.method, "tune": options.tune,
               "global_step": trainer.state.global_step, "data": run.stats.summary()}
    if run.eval_examples:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
        # as logged (TRL adds its reward metrics to the log, not to every version's returned dict)
        logged = [h["eval_rewards/accuracies"] for h in trainer.state.log_history if "eval_rewards/accuracies" in h]
        if logged:
            summary["eval_reward_accuracy"] = logged[-1]
    if options.tune == "full":
        save_full_model(run)
        if trainer.is_world_process_zero():  # recorded as a preference run (save_full_model writes method: full)
            meta_path = out / METADATA_FILE
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            meta.update(method=options.method, trained="full")
            tmp = meta_path.with_name(meta_path.name + ".tmp")
            tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
            tmp.replace(meta_path)
    elif trainer.is_world_process_zero():
        save_atomically(out, lambda staging: (trainer.model.save_pretrained(staging, selected_adapters=["default"]),
                                              run.tokenizer.save(staging)))
    if trainer.is_world_process_zero():
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        plot_rewards(out / "metrics.jsonl", out / "rewards.png")
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    if losses:
        summary["first_loss"], summary["last_loss"] = losses[0], losses[-1]
    accuracies = [h["rewards/accuracies"] for h in history if "rewards/accuracies" in h]
    if accuracies:
        summary["last_reward_accuracy"] = accuracies[-1]
    if run.stop is not None and run.stop.stopped_at is not None:
        summary["stopped"] = f"{run.stop.requested} at step {run.stop.stopped_at}"
    return summary


# ----------------------------------------------------------------------------------------------- dry run


def estimate_preference_memory(config, options: TrainOptions, n_params: int, n_trainable: int, longest: int,
                               precision: str, checkpointing: str) -> dict:
    """The supervised estimate (:func:`~.plan.estimate_memory`) for twice the rows — chosen and rejected of every
    pair run through the model together — plus DPO's reference: with a new adapter, a no-grad forward of the base
    (one layer's activations at a time, while the policy's are kept); with ``--init-adapter`` also a frozen copy of
    the adapter; with ``--tune full`` a second copy of the model in the training precision.  ORPO has none."""
    from .plan import BYTES

    full = options.tune == "full"
    tokens = 2 * options.batch_size * longest
    parts = estimate_memory(config, n_params, n_trainable, tokens, precision, checkpointing, full)
    total = parts.pop("total")
    if options.method == "dpo":
        # one layer's working set of the reference forward (the "full" mode's per-layer term)
        layer_inputs = tokens * config.model_dim * BYTES[precision] * config.num_transformer_layers
        one_layer = estimate_memory(config, n_params, n_trainable, tokens, precision, "full", full)["activations"]
        parts["reference_forward"] = max(0, one_layer - layer_inputs - tokens * config.vocab_size * 8)
        if full:
            parts["reference_model"] = (n_params + n_trainable) * BYTES[precision]
        elif options.init_adapter:
            parts["reference_adapter"] = n_trainable * 4
        total += sum(v for k, v in parts.items() if k.startswith("reference_"))
    parts["total"] = total
    return parts


def plan_preference(options: TrainOptions) -> dict:
    """``--dry-run`` of a preference run: the data (pairs), steps, memory and disk, without loading weights."""
    from ..device import describe
    from .recipe import DTYPE_OF, prepare

    require_trl(options.method)
    p = prepare(options, load_preference_data)
    device, config, stats, train_pairs, eval_pairs = p.device, p.config, p.stats, p.train, p.eval
    base = supervised_view(options)
    trainable, total = count_parameters(config, base)
    steps_per_epoch, steps = count_steps(options, len(train_pairs))
    full = options.tune == "full"
    disk, _ = estimate_disk(trainable, steps, options.save_steps, options.save_total_limit,
                            n_saved=total if full else None)
    lengths = sorted(p.longest for p in train_pairs)
    precision = resolve_precision(options.precision, device)
    checkpointing, why = decide_checkpointing(base, config, total - trainable, trainable, 2 * lengths[-1], precision,
                                              device)
    memory = estimate_preference_memory(config, options, total - trainable, trainable, lengths[-1], precision,
                                        checkpointing)
    return {
        "model": options.model, "method": options.method, "tune": options.tune, "beta": options.beta,
        "init_adapter": options.init_adapter,
        "reference": reference_of(options),
        "device": describe(device, DTYPE_OF[precision]), "precision": precision,
        "parameters_total": total, "parameters_trainable": trainable,
        "trainable_share": round(trainable / total, 6),
        "data": stats.summary(), "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
        "longest_pair": lengths[-1], "median_pair": lengths[len(lengths) // 2],
        "global_batch": options.batch_size * options.grad_accum * world()[1],
        "steps_per_epoch": steps_per_epoch, "total_steps": steps,
        "gradient_checkpointing": f"{checkpointing} ({why})",
        "estimated_memory_gib": {k: round(v / 2**30, 2) for k, v in memory.items()},
        "memory_fits": memory_fits(memory["total"], device, "a smaller --batch-size or --max-length"
                                   + ("" if full else ", or --quantize 4bit")),
        "estimated_disk_gib": round(disk / 2**30, 3),
    }


__all__ = ["PREFERENCE_METHODS", "setup_preference", "finish_preference", "plan_preference", "require_trl"]
