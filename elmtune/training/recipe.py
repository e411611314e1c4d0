"""The LoRA fine-tuning recipe behind ``elmtune train``: setup → train → finish.

Training runs on transformers' Trainer (so ``torchrun`` / ``accelerate launch`` work unchanged), with PEFT
LoRA on our native OpenELM.  Everything a run writes lands in ``output_dir``::

    config.yaml                 the resolved options (flags > YAML > defaults)
    adapter_config.json         the PEFT adapter, loadable with stock ``PeftModel.from_pretrained``
    adapter_model.safetensors
    elmtune.json                base model, template, fields, formats, chat template: what inference renders with
    tokenizer.model …           the tokenizer the adapter was trained with
    checkpoints/checkpoint-N/   resumable state (optimizer, scheduler, RNG, data position)
    metrics.jsonl, loss.png     the training / evaluation curves
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from .. import __version__
from ..data import DataSpec, EncodeStats, Example, load_examples
from ..device import DeviceError, local_rank, pick_device, resolve_precision
from ..hardware import probes_agreed_across_ranks
from ..models import PRESETS
from ..data.collate import PackedCollator
from ..models.loading import load_config
from ..models.openelm import settle_cpu_attention
from ..options import write_yaml
from ..tokenizer import Tokenizer, load_tokenizer
from .args import PREFERENCE_METHODS, TrainOptions
from .callbacks import MetricsCallback, ProgressCallback, plot_losses
from .dropout import use_fast_dropout
from .checkpointing import enable_checkpointing, settle_selective
from .full import set_trainable
from .fused_lora import use_fused_lora
from .plan import (count_parameters, count_steps, decide_checkpointing, estimate_disk, lora_config, plan_run,
                   world)
from .safety import (MANIFEST, AtomicCheckpointTrainer, GracefulStop, NonFiniteGuard, RunLock, check_free_space,
                     is_complete, newest_complete_checkpoint, save_atomically)

DTYPE_OF = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

log = logging.getLogger("elmtune")
METADATA_FILE = "elmtune.json"
RUN_FILES = ("config.yaml", "adapter_config.json", "metrics.jsonl", "checkpoints")
# Everything a run writes (and --overwrite removes); other files in the directory are never touched.
RUN_OUTPUTS = RUN_FILES + ("adapter_model.safetensors", METADATA_FILE, "loss.png", "tensorboard", "README.md",
                            "rewards.png",  # --method dpo/orpo: reward accuracy and margin
                            # --method full: the model in Apple's layout
                            "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
MODEL_SHARDS = "model-*-of-*.safetensors"  # a sharded full model's weight files


class TrainError(ValueError):
    """A run that cannot start as asked; the message says why and what to do."""


@dataclass
class Run:
    options: TrainOptions
    output_dir: Path
    tokenizer: Tokenizer
    spec: DataSpec
    train_examples: list[Example]
    eval_examples: list[Example]
    stats: EncodeStats
    trainer: Trainer | None = None
    resume_from: str | None = None
    stop: GracefulStop | None = None
    lock: RunLock | None = None

    @property
    def model(self):
        return self.trainer.model

    def close(self) -> None:
        """Close the progress bar, give back the signal handlers and the output-directory lock (also after a
        failure)."""
        if self.trainer is not None:
            for callback in self.trainer.callback_handler.callbacks:
                if isinstance(callback, ProgressCallback):
                    callback.close()
        if self.stop is not None:
            self.stop.restore()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# ----------------------------------------------------------------------------------------------- setup helpers


def setup_device(options: TrainOptions) -> torch.device:
    """This process's device, made CUDA's current device before anything else touches CUDA.

    Under torchrun every process would otherwise create a context on GPU 0 (the memory estimate's first query
    alone costs ~0.5 GB there per process) and read GPU 0's free memory instead of its own.
    """
    size = world()[1]
    if size > 1 and options.device.startswith("cuda:"):
        raise TrainError(f"--device {options.device}: under torchrun each process trains on its own GPU (its "
                         "LOCAL_RANK); pass --device cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES")
    try:
        device = pick_device(options.device)
    except DeviceError as error:
        raise TrainError(str(error)) from None
    if device.type != "cuda":
        return device
    count, rank = torch.cuda.device_count(), local_rank()
    if size > 1:
        if rank >= count:
            raise TrainError(f"process {rank} on this node has no GPU of its own ({count} GPU(s) here): start "
                             f"torchrun --nproc_per_node {count}, or train on the CPUs with --device cpu")
        device = torch.device("cuda", rank)
    elif (device.index or 0) != 0:
        # The Trainer trains a single process on the first visible GPU; only the environment can change which.
        raise TrainError(f"--device {options.device}: a single process trains on the first visible GPU; run "
                         f"with CUDA_VISIBLE_DEVICES={device.index} and --device cuda")
    else:
        device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


def check_attention(options: TrainOptions, device: torch.device) -> None:
    """An attention implementation that cannot train here: one line naming what to install or choose instead."""
    impl = options.attn_implementation
    if impl.startswith("flash_attention"):
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        if device.type != "cuda":
            raise TrainError(f"--attn-implementation {impl} runs on CUDA GPUs only (training here on {device}); "
                             "use sdpa (the default)")
        if not (is_flash_attn_2_available if impl.endswith("2") else is_flash_attn_3_available)():
            package = "flash-attn" if impl.endswith("2") else "flash-attn 3 (flash_attn_interface, from its hopper/ folder)"
            raise TrainError(f"--attn-implementation {impl} needs the {package} package for this GPU and torch "
                             "(pip install flash-attn --no-build-isolation); or use sdpa (the default), which "
                             "keeps packed examples apart just as exactly")
    elif impl == "flex_attention" and device.type != "cuda":
        raise TrainError(f"--attn-implementation flex_attention has no backward pass on {device.type} in PyTorch "
                         f"{torch.__version__.split('+')[0]} (training needs one); use sdpa (the default) or eager")


def check_distributed(options: TrainOptions, device: torch.device) -> None:
    """Engine choices that cannot work as asked, refused before anything is loaded.

    * FSDP shards across GPUs only: accelerate runs CPU (and mps) processes as plain DDP whatever is asked, so
      the run would neither shard nor say so;
    * DeepSpeed applies its update inside backward, before any callback sees the gradients: a step cannot be
      skipped there (``stop`` still works, from the loss, see :class:`~.safety.NonFiniteGuard`).
    """
    if options.distributed == "fsdp" and world()[1] > 1 and device.type != "cuda":
        raise TrainError(f"--distributed fsdp shards the model across CUDA GPUs only; these processes train on "
                         f"{device.type}, where it would run as plain DDP: use --distributed ddp")
    if options.method in PREFERENCE_METHODS and options.distributed != "ddp" and world()[1] > 1:
        raise TrainError(f"--method {options.method} runs under torchrun with --distributed ddp only (FSDP/DeepSpeed "
                         "would shard the reference forward differently and are not tested here)")
    if options.distributed == "deepspeed" and options.nan_policy == "skip-step":
        raise TrainError("--nan-policy skip-step cannot work with --distributed deepspeed (DeepSpeed updates the "
                         "weights inside backward, before a step could be dropped); use --nan-policy stop, which "
                         "checks the loss on every process before backward, or --distributed ddp/fsdp")


def check_output_dir(options: TrainOptions) -> tuple[Path, RunLock | None]:
    """The output directory, checked, locked for this run and (with --overwrite) cleared of an earlier run."""
    if not options.output_dir:
        raise TrainError("no --output-dir given")
    out = Path(options.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainError(f"--output-dir {out}: exists and is not a directory")
    if world()[0] != 0:  # only rank 0 checks and prepares the output directory (the others would race it)
        return out, None
    previous = [name for name in RUN_FILES if (out / name).exists()]
    if previous and not (options.overwrite or options.resume):
        raise TrainError(f"--output-dir {out} already holds a run ({', '.join(previous)}); pass --resume auto to "
                         "continue it, --overwrite to replace it, or choose another directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainError(f"--output-dir {out}: cannot create it ({error.strerror})") from None
    try:  # a real write: os.access says yes to root even on a read-only filesystem
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise TrainError(f"--output-dir {out}: not writable ({error.strerror})") from None
    lock = RunLock(out)  # before anything is removed: a running run's files are never touched
    if previous and options.overwrite and not options.resume:
        for name in RUN_OUTPUTS:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        for shard in out.glob(MODEL_SHARDS):
            shard.unlink()
    return out, lock


def check_world_size(out: Path) -> None:
    """Data order and position in a checkpoint depend on the number of processes: refuse a different one."""
    meta = out / METADATA_FILE
    recorded = json.loads(meta.read_text()).get("world_size", 1) if meta.is_file() else None
    size = world()[1]
    if recorded is not None and recorded != size:
        def plural(n):
            return f"{n} process" + ("es" if n != 1 else "")

        raise TrainError(f"--resume: this run was trained by {plural(recorded)} and would now continue with "
                         f"{plural(size)}; the data order would not match. Resume with the same number of "
                         "processes (torchrun --nproc_per_node), or start a new run")


def find_resume_checkpoint(options: TrainOptions, out: Path) -> str | None:
    if not options.resume:
        return None
    check_world_size(out)
    if options.resume == "auto":
        found = newest_complete_checkpoint(out / "checkpoints")
        if found is None:
            log.warning("--resume auto: no complete checkpoint in %s yet; starting from the beginning",
                        out / "checkpoints")
        return str(found) if found else None
    path = Path(options.resume).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise TrainError(f"--resume {path}: not a checkpoint directory (no trainer_state.json)")
    if not is_complete(path):
        raise TrainError(f"--resume {path}: incomplete checkpoint (no valid {MANIFEST}; interrupted while saving?)")
    return str(path)


def check_disk(options: TrainOptions, out: Path, n_trainable: int, n_examples: int, resume_from: str | None,
               n_total: int | None = None) -> None:
    """Before training: the checkpoints and adapter (or full model) still to be written must fit on the output
    disk."""
    done = int(Path(resume_from).name.split("-")[1]) if resume_from else 0
    need, what = estimate_disk(n_trainable, count_steps(options, n_examples)[1], options.save_steps,
                               options.save_total_limit, done,
                               n_saved=n_total if options.method == "full" else None)
    check_free_space(out, need, what)


def split_eval(examples: list[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``val_size`` examples (≥ 1) or that fraction (< 1), chosen with ``seed``."""
    if val_size <= 0:
        return examples, []
    count = int(val_size) if val_size >= 1 else max(1, round(val_size * len(examples)))
    if count >= len(examples):
        raise TrainError(f"--val-size {val_size} leaves no training examples (only {len(examples)} kept)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def default_tokenizer(options: TrainOptions) -> str:
    if options.tokenizer:
        return options.tokenizer
    path = Path(options.model).expanduser()
    if path.is_dir() and any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return str(path)
    raise TrainError("no --tokenizer given and the model has none of its own (OpenELM checkpoints ship without "
                     "one; the tutorial uses Llama-2's: --tokenizer meta-llama/Llama-2-7b-hf or a local copy)")


def load_data(options: TrainOptions, tokenizer: Tokenizer, spec: DataSpec, load=load_examples,
              what: str = "training examples", dropped: str = "dropped with no answer left"):
    """(train, held out, stats): ``--data`` read by ``load`` (examples, or preference pairs), held out from it
    (``--val-size``) or read from ``--val-file``."""
    if not options.data:
        raise TrainError("no --data given")
    examples, stats = load(options.data, tokenizer, spec, options.on_bad_record)
    if options.val_file:
        train_examples, (eval_examples, _) = examples, load([options.val_file], tokenizer, spec, options.on_bad_record)
    else:
        train_examples, eval_examples = split_eval(examples, options.val_size, options.seed)
    if not train_examples:
        raise TrainError(f"no usable {what} in {', '.join(options.data)} "
                         f"({stats.dropped_all_masked} {dropped}, {stats.skipped.count} bad)")
    return train_examples, eval_examples, stats


def build_model(options: TrainOptions, dtype: torch.dtype, checkpointing: str, device: torch.device | None = None):
    """The model a run trains: the LoRA/DoRA model (:func:`build_peft_model`), or for ``--method full`` the model
    itself in fp32 (:func:`build_full_model`)."""
    if options.method == "full":
        return build_full_model(options, checkpointing, device)
    return build_peft_model(options, dtype, checkpointing, device)


def build_full_model(options: TrainOptions, checkpointing: str, device: torch.device | None = None):
    """The model with its own weights trainable (those ``--trainable`` selects), read in fp32 whatever the
    training precision: fp32 master weights, 16-bit compute under the Trainer's autocast (see
    :mod:`elmtune.training.full`)."""
    from ..models.loading import load_model

    on = device if device is not None and device.type != "cpu" else None
    model = load_model(options.model, dtype=torch.float32, seed=options.seed, device=on,
                       attn_implementation=options.attn_implementation)
    model.supervised_logits_only = not options.full_logits
    set_trainable(model, options.trainable)
    enable_checkpointing(model, checkpointing)
    return model


def build_peft_model(options: TrainOptions, dtype: torch.dtype, checkpointing: str,
                     device: torch.device | None = None):
    """The LoRA model, its weights read (or a preset built) straight onto ``device`` in ``dtype``."""
    from peft import get_peft_model

    from ..models.loading import load_model

    kwargs = {"attn_implementation": options.attn_implementation}
    if options.quantize == "4bit":
        kwargs["quantization_config"] = _bnb_4bit_config(options, dtype)
    on = device if device is not None and device.type != "cpu" else None
    model = load_model(options.model, dtype=dtype, seed=options.seed, device=on, **kwargs)
    model.supervised_logits_only = not options.full_logits
    if options.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing != "off")
        keep_embeddings_in(model, dtype)
    lora = lora_config(options, task_type="CAUSAL_LM")
    torch.manual_seed(options.seed)  # LoRA A matrices are random: the same seed gives the same start
    peft_model = get_peft_model(model, lora)
    if options.fast_lora_dropout:
        use_fast_dropout(peft_model)
    if options.fused_lora:
        use_fused_lora(peft_model)
    if dtype != torch.float32:
        # Training runs under autocast, which casts the LoRA matmuls to `dtype` anyway; PEFT's default upcast of
        # every LoRA input to the adapter's fp32 only costs a full copy per adapted layer (and fp32 dropout).
        for module in peft_model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    # Set on the model here, not through TrainingArguments: the selective policy is a callable of this model.
    enable_checkpointing(peft_model, checkpointing)
    return peft_model


def keep_embeddings_in(model, dtype: torch.dtype) -> None:
    """Undo ``prepare_model_for_kbit_training``'s fp32 upcast for the token embedding and output head.

    It upcasts every weight that is not quantized; OpenELM's (tied) embedding is the output head, ~100M
    parameters for the 3B model, which the chunked loss would cast back to ``dtype`` for every chunk.  The norms
    (small, and precision-sensitive) stay in fp32.
    """
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and module.weight.dtype != dtype:
            module.weight.data = module.weight.data.to(dtype)


def _bnb_4bit_config(options: TrainOptions, dtype: torch.dtype):
    if options.model in PRESETS:
        raise TrainError("--quantize 4bit quantizes pretrained weights; it cannot be used with a random-init preset")
    if not torch.cuda.is_available():
        raise TrainError("--quantize 4bit (QLoRA) needs a CUDA GPU, and none is available here; train without it")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainError("--quantize 4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    # Compute in the training dtype (fp16 on GPUs without native bf16); storing the packed 4-bit weights in
    # that dtype too lets FSDP shard them (it only shards floating-point parameters).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def training_arguments(options: TrainOptions, out: Path, precision: str, has_eval: bool,
                       device: torch.device | None = None, cls: type = TrainingArguments,
                       **extra) -> TrainingArguments:
    """The Trainer's arguments (``cls``: a subclass such as TRL's DPOConfig, given ``extra`` fields and overrides);
    under torchrun, building them starts the process group."""
    if options.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise TrainError("--tensorboard needs the tensorboard package: "
                             "pip install 'elmtune[tensorboard]'") from None
    eval_steps = options.eval_steps or options.save_steps
    cpu = (device.type == "cpu") if device is not None else not torch.cuda.is_available()
    args = cls(**{**dict(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum, learning_rate=options.lr,
        num_train_epochs=options.epochs, max_steps=options.max_steps, lr_scheduler_type=options.lr_scheduler,
        warmup_steps=options.warmup_steps, weight_decay=options.weight_decay, max_grad_norm=options.max_grad_norm,
        bf16=precision == "bf16", fp16=precision == "fp16",
        prediction_loss_only=True,
        logging_steps=options.logging_steps, save_steps=options.save_steps, save_total_limit=options.save_total_limit,
        eval_strategy="steps" if has_eval else "no", eval_steps=eval_steps if has_eval else None,
        report_to=[], seed=options.seed, data_seed=options.seed,
        **(distributed_arguments(options) if world()[1] > 1 else {}),
        remove_unused_columns=False, disable_tqdm=True,
        include_num_input_tokens_seen="all" if options.packing else "non_padding",  # packed rows hold no padding
        dataloader_num_workers=0, use_cpu=cpu, log_level="warning",
    ), **extra})
    return one_gpu_per_process(args)


def one_gpu_per_process(args: TrainingArguments) -> TrainingArguments:
    """One process sees several GPUs (no torchrun): train on one of them, never through ``nn.DataParallel``.

    The Trainer would wrap the model in DataParallel, which splits each batch along its rows — a packed
    micro-batch is one row, so one GPU would do all the work while the step and disk plans assumed all of them.
    """
    if world()[1] == 1 and args.n_gpu > 1:
        log.warning("%d GPUs are visible but elmtune runs as one process: training on %s only. To train on all "
                    "of them: torchrun --nproc_per_node %d -m elmtune.cli train …", args.n_gpu, args.device,
                    args.n_gpu)
        args._n_gpu = 1  # what the Trainer reads to decide on DataParallel (and to scale the batch size)
    return args


def tensorboard_callback(out: Path) -> TrainerCallback:
    """transformers' TensorBoard callback, writing to OUTPUT_DIR/tensorboard."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "tensorboard")))


class _Features(torch.utils.data.Dataset):
    """Examples as the dicts the collator pads."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i].features()


def make_collator(tokenizer: Tokenizer, packing: bool = False):
    """Padding-free packed rows, or the tutorial's collator: right padding with pad (= eos) ids, labels -100."""
    if packing:
        return PackedCollator()
    tokenizer.hf.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer.hf, padding=True, label_pad_token_id=-100)


def metadata(options: TrainOptions, spec: DataSpec, stats: EncodeStats, tokenizer: Tokenizer) -> dict:
    """``elmtune.json``: the base model, and everything inference needs to render prompts as training did —
    the alpaca template and fields, the record formats and the chat template's Jinja source itself."""
    return {"elmtune_version": __version__, "base_model": options.model, "method": options.method,
            "tokenizer": options.tokenizer, "template": spec.template.to_dict(), "fields": vars(spec.fields), "max_length": spec.max_length,
            **spec.adapter_metadata(tokenizer, stats), "data": stats.summary(), "world_size": world()[1]}


def distributed_arguments(options: TrainOptions) -> dict:
    """TrainingArguments for the chosen engine (used only under a multi-process launcher)."""
    if options.distributed == "fsdp":
        # FSDP2 (per-parameter sharding), each decoder layer its own unit; the mixed-precision policy (bf16
        # compute, fp32 LoRA weights and gradient reduction) is set on the plugin by fsdp_mixed_precision.
        return {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["OpenELMDecoderLayer"],
                                              "reshard_after_forward": True}}
    if options.distributed == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise TrainError("--distributed deepspeed needs DeepSpeed: pip install deepspeed") from None
        return {"deepspeed": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"},
                              "fp16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}}
    return {"ddp_find_unused_parameters": False}


def fsdp_mixed_precision(trainer: Trainer, dtype: torch.dtype) -> None:
    """FSDP2 with a frozen base in ``dtype`` and fp32 LoRA weights: compute in ``dtype``, reduce gradients in fp32.

    accelerate's default policy for bf16 would reduce the LoRA gradients in bf16 as well.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or dtype == torch.float32:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


class ReleaseFreedMemory(TrainerCallback):
    """On glibc, hand freed heap pages back to the OS (``malloc_trim``) once the process has grown.

    Packed rows differ in length from step to step, so tensors of ever new sizes are allocated; glibc keeps the
    freed blocks in a fragmented heap and the process would grow by hundreds of MB per step on CPU.  Trimming
    costs page faults afterwards, so it runs only when the resident size grew by ``threshold`` since last time.
    """

    def __init__(self, threshold: int = 256 << 20):
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        self.trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
        self.threshold = threshold
        self.baseline = self._resident()

    @staticmethod
    def _resident() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.trim is None:
            return
        if self._resident() - self.baseline > self.threshold:
            self.trim(0)
            self.baseline = self._resident()


@dataclass
class Prepared:
    """What a run (or its dry run) knows before any weight is loaded."""

    device: torch.device
    config: object
    tokenizer: Tokenizer
    spec: DataSpec
    train: list
    eval: list
    stats: EncodeStats
    resume_from: str | None = None


def prepare(options: TrainOptions, load, out: Path | None = None) -> Prepared:
    """The checks and reads every run and dry run starts with, in this order: this process's device first (nothing
    may touch CUDA before its GPU is chosen), the attention and distributed choices, the model's config (fails fast
    on a wrong --model, before data is read), with ``out`` the checkpoint to resume from, then the tokenizer and
    the data, read by ``load(options, tokenizer, spec)`` → (train, eval, stats)."""
    device = setup_device(options)
    check_attention(options, device)
    check_distributed(options, device)
    config = load_config(options.model)
    resume_from = find_resume_checkpoint(options, out) if out is not None else None
    tokenizer = load_tokenizer(default_tokenizer(options))
    spec = DataSpec.from_options(options)
    train, held_out, stats = load(options, tokenizer, spec)
    return Prepared(device, config, tokenizer, spec, train, held_out, stats, resume_from)


def settle_measured_choices(model, config, checkpointing: str, why: str, row_lengths: list[int],
                            dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """The hardware probes a run needs, taken at setup by every rank together (under torchrun rank 0 measures,
    :func:`~elmtune.hardware.probes_agreed_across_ranks`): CPU attention's precision, and for ``on`` whether
    selective checkpointing beats ``full`` here at the median row length (else the model switches to ``full``).
    Returns the checkpointing mode and its reason."""
    with probes_agreed_across_ranks():
        settle_cpu_attention(config, dtype, device)
        if checkpointing == "on":
            median = sorted(row_lengths)[len(row_lengths) // 2]
            checkpointing, measured = settle_selective(model, median, dtype, device)
            why = f"{why}; {measured}"
    return checkpointing, why


def start_run(options: TrainOptions, out: Path, lock: RunLock | None, load,
              describe) -> tuple[Run, torch.device, object]:
    """:func:`prepare`, then the :class:`Run`, and (rank 0) its ``config.yaml`` and ``elmtune.json``
    (``describe(options, spec, stats, tokenizer)``); returns the run, the device and the model's config."""
    p = prepare(options, load, out)
    run = Run(options, out, p.tokenizer, p.spec, p.train, p.eval, p.stats, resume_from=p.resume_from, lock=lock)
    if world()[0] == 0:
        write_yaml(options, out / "config.yaml")
        (out / METADATA_FILE).write_text(json.dumps(describe(options, p.spec, p.stats, p.tokenizer), indent=2),
                                         encoding="utf-8")
    return run, p.device, p.config


# ----------------------------------------------------------------------------------------------- the recipe


def setup(options: TrainOptions, callbacks: list[TrainerCallback] | tuple = (), build=None) -> Run:
    """Check everything that can be checked before any weights are loaded, then build the Trainer (with
    ``build(options, out, lock, callbacks)``: the supervised one by default); the output directory's lock is given
    back if that fails."""
    out, lock = check_output_dir(options)
    try:
        return (build or _build_run)(options, out, lock, callbacks)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build_run(options: TrainOptions, out: Path, lock: RunLock | None, callbacks) -> Run:
    run, device, config = start_run(options, out, lock, load_data, metadata)
    tokenizer, train_examples, eval_examples, resume_from = run.tokenizer, run.train_examples, run.eval_examples, \
        run.resume_from

    precision = resolve_precision(options.precision, device)
    dtype = DTYPE_OF[precision]
    trainable, total = count_parameters(config, options)
    if world()[0] == 0:
        check_disk(options, out, trainable, len(train_examples), resume_from, total)
    # Before the memory plan: under torchrun this starts the process group the ranks agree through.
    args = training_arguments(options, out, precision, bool(eval_examples), device)
    longest = max(len(e.input_ids) for e in train_examples)
    checkpointing, why = decide_checkpointing(options, config, total - trainable, trainable, longest, precision,
                                              device)
    model = build_model(options, dtype, checkpointing, device)
    checkpointing, why = settle_measured_choices(model, config, checkpointing, why,
                                                 [len(e.input_ids) for e in train_examples], dtype, device)
    overridden = options.gradient_checkpointing not in ("auto", checkpointing)
    (log.warning if overridden else log.info)("gradient checkpointing %s (%s)", checkpointing, why)
    run.stop = GracefulStop()
    guard = NonFiniteGuard(options.nan_policy, out / "checkpoints")
    run.trainer = AtomicCheckpointTrainer(
        model=model, args=args,
        train_dataset=_Features(train_examples), eval_dataset=_Features(eval_examples) if eval_examples else None,
        data_collator=make_collator(tokenizer, options.packing),
        callbacks=[MetricsCallback(out / "metrics.jsonl"), ProgressCallback(),
                   *([ReleaseFreedMemory()] if device.type == "cpu" else []),
                   guard, run.stop, *([tensorboard_callback(out)] if options.tensorboard else []), *callbacks],
    )
    if run.trainer.is_deepspeed_enabled:
        run.trainer.loss_guard = guard  # the gradients are out of the guard's reach there: check the loss
    if options.distributed == "fsdp" and world()[1] > 1:
        if not run.trainer.is_fsdp_enabled:  # never silently unsharded
            raise TrainError("--distributed fsdp: accelerate did not enable FSDP for this run (distributed type "
                             f"{run.trainer.accelerator.distributed_type}); use --distributed ddp")
        fsdp_mixed_precision(run.trainer, dtype)
    run.trainer.remove_callback(PrinterCallback)  # our progress bar shows the logs; metrics.jsonl keeps them
    return run


def finish(run: Run) -> dict:
    """Final evaluation, the adapter, tokenizer and plot; returns the run's summary."""
    trainer, out = run.trainer, run.output_dir
    summary = {"output_dir": str(out), "method": run.options.method, "global_step": trainer.state.global_step,
               "data": run.stats.summary()}
    if run.eval_examples:
        metrics = trainer.evaluate()
        summary["eval_loss"] = metrics["eval_loss"]
    if run.options.method == "full":
        save_full_model(run)
    elif trainer.is_world_process_zero():
        save_atomically(out, lambda staging: (trainer.model.save_pretrained(staging), run.tokenizer.save(staging)))
    if trainer.is_world_process_zero():
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if train_losses:
        summary["first_loss"], summary["last_loss"] = train_losses[0], train_losses[-1]
    if run.stop is not None and run.stop.stopped_at is not None:
        summary["stopped"] = f"{run.stop.requested} at step {run.stop.stopped_at}"
    return summary


def save_full_model(run: Run, max_shard_size: str = "2GB") -> None:
    """A full fine-tune's output: the model in Apple's layout (config with Apple's keys, sharded fp32
    safetensors), the tokenizer and ``elmtune.json`` (recording the method), all moved into the output directory
    at once (:func:`~.safety.save_atomically`).  Called on every process: under FSDP and DeepSpeed the fp32
    weights are gathered first (:func:`full_state_dict`)."""
    from ..merge import save_apple_checkpoint

    trainer, out = run.trainer, run.output_dir
    state_dict = full_state_dict(run)
    if not trainer.is_world_process_zero():
        return
    meta_path = out / METADATA_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    meta.update(method="full", trainable=list(run.options.trainable))

    def write(staging: Path) -> None:
        save_apple_checkpoint(trainer.model, staging, max_shard_size, state_dict=state_dict)
        run.tokenizer.save(staging)
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    save_atomically(out, write)


def full_state_dict(run: Run) -> dict | None:
    """The weights a full fine-tune saves, whole and in fp32, when the module itself does not hold them; None when
    it does (one process, DDP).  Called on every process: gathering is collective.

    * FSDP: accelerate gathers the shards (onto rank 0's CPU).
    * DeepSpeed: with bf16/fp16 enabled DeepSpeed casts the module to 16 bits and keeps the fp32 master weights in
      ZeRO's optimizer partitions; saving the module would round every update to 16 bits.  Each trained weight is
      gathered from its fp32 master (``deepspeed.utils.safe_get_full_fp32_param``); a frozen one has no master and
      never changed, so its exact fp32 value is read back from the starting model.
    """
    trainer = run.trainer
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_deepspeed_enabled:
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    model = trainer.model
    masters = {name: safe_get_full_fp32_param(p) for name, p in model.named_parameters() if p.requires_grad}
    if not trainer.is_world_process_zero():
        return None
    state_dict = {name: tensor.detach().to("cpu", torch.float32) for name, tensor in model.state_dict().items()}
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen and any(p.dtype != torch.float32 for p in model.parameters()):
        from ..models.loading import load_model

        start = load_model(run.options.model, dtype=torch.float32, seed=run.options.seed).state_dict()
        state_dict.update({name: start[name] for name in frozen})
    state_dict.update({name: master.detach().to("cpu", torch.float32) for name, master in masters.items()})
    return state_dict


def train(options: TrainOptions, callbacks: list[TrainerCallback] | tuple = ()) -> dict:
    """Run ``elmtune train`` from Python: returns a summary (steps, losses, where the adapter is)."""
    if options.dry_run:
        return plan_run(options)
    start, end = setup, finish
    if options.method in PREFERENCE_METHODS:  # DPO / ORPO on TRL's trainers
        from .preference import finish_preference as end, setup_preference as start
    run = start(options, callbacks)
    try:
        run.trainer.train(resume_from_checkpoint=run.resume_from)
        return end(run)
    finally:
        run.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Free the trainer (its DDP wrapper holds the process group) while every rank is still here, then tear
            # the group down together.  Freed later, by a destructor after another rank had exited, a gloo group
            # could wait forever: a rare hang at exit, seen with the trainer still alive until train() returned.
            run.trainer = None
            gc.collect()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
