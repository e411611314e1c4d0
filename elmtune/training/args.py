"""Options of ``elmtune data inspect`` and ``elmtune train``: each default is defined here, once.

The defaults are the tutorial's recipe: LoRA r=32, alpha=32, dropout 0.1 on token_embeddings, qkv_proj,
out_proj, proj_1, proj_2; batch 8 × accumulation 4; lr 1e-4; max length 384; bf16 where the hardware has it;
a checkpoint every 600 steps.  Gradient checkpointing (always on in the tutorial) is `auto` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.chat import TEMPLATE_NAMES
from ..data.encode import TRAIN_ON
from ..data.formats import FORMATS
from ..data.templates import FIELD_PRESETS, TEMPLATES
from ..device import DEVICE_HELP
from ..options import SEED_MAX, OptionsError, check_ranges, opt

TUTORIAL_TARGETS = ["token_embeddings", "qkv_proj", "out_proj", "proj_1", "proj_2"]
METHODS = ("lora", "dora", "full")
#: Preference tuning on TRL's trainers (elmtune.training.preference); --tune says which weights they train.
PREFERENCE_METHODS = ("dpo", "orpo")
ATTENTION_CHOICES = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass
class DataOptions:
    data: list[str] = opt([], "training data: a JSON array, JSONL, Parquet or CSV file, a directory of them, or a "
                              "saved `datasets` folder; repeat the flag for several")
    tokenizer: str | None = opt(None, "tokenizer directory or hub id (default: the model directory's own)")
    template: str = opt("openelm-sep", f"prompt template of alpaca records: {', '.join(TEMPLATES)}, or a format "
                                       "string with {instruction} and {input}")
    fields: str = opt("en", f"record fields: {', '.join(FIELD_PRESETS)} (en_instruction/en_input/en_output, "
                            "instruction/input/output) or instruction=KEY,input=KEY,output=KEY")
    max_length: int = opt(384, "maximum tokens per example (prompt + answer + eos); longer ones are cut",
                          minimum=2)
    on_bad_record: str = opt("error", "a record with missing/wrong fields or broken JSON: stop with an error, or "
                                      "skip it and count it", choices=("error", "skip"))
    format: str = opt("auto", "record format: auto (each file's from its keys), alpaca (--fields), messages "
                              "(role/content), sharegpt (conversations: from/value), completion (prompt + "
                              "completion), text", choices=("auto", *FORMATS))
    chat_template: str = opt("auto", f"how conversations are rendered: {', '.join(TEMPLATE_NAMES)} (auto: the "
                                     "tokenizer's own chat_template, else openelm: system text, each user turn "
                                     "then <sep>, each assistant turn then eos), a Jinja file, or a template "
                                     "string")
    train_on: str = opt("all-assistant", "supervised tokens of conversations: every assistant turn (content and "
                                         "end token), only the last one, or all tokens", choices=TRAIN_ON)


@dataclass
class TrainOptions(DataOptions):
    model: str = opt("", "base model: a checkpoint directory (Apple's layout), a hub id (org/name or "
                         "modelscope:org/name), or a preset for random init (openelm-270m, …)")
    output_dir: str = opt("", "where the adapter (or, with --method full, the model), checkpoints, metrics and "
                              "plots go", short="-o")
    method: str = opt("lora", "what is trained: lora (low-rank adapters on --lora-targets, the tutorial's), dora "
                              "(weight-decomposed LoRA) or full (the model's own weights, held in fp32 and trained "
                              "under bf16/fp16 autocast; the output is a complete model in Apple's layout); dpo or "
                              "orpo: preference tuning on prompt/chosen/rejected records (needs "
                              "'elmtune[preference]'), training what --tune says",
                      choices=(*METHODS, *PREFERENCE_METHODS))
    tune: str = opt("lora", "with --method dpo/orpo: what is trained: lora (the default; DPO's reference is the base "
                            "with the adapter disabled), dora, or full (DPO keeps a second, frozen copy of the model "
                            "as its reference)", choices=METHODS)
    beta: float = opt(0.1, "with --method dpo: the KL penalty β (how far the policy may move from the reference); "
                           "with --method orpo: the weight λ of the odds-ratio term", above=0)
    init_adapter: str | None = opt(None, "with --method dpo/orpo and --tune lora/dora: start from this adapter (an "
                                         "`elmtune train` output, e.g. a supervised one) instead of a new one; its "
                                         "base model must be --model. DPO's reference is then that adapter, frozen")
    trainable: list[str] = opt([], "with --method full: which parameters train, as fnmatch patterns on parameter "
                                   "names (e.g. 'transformer.layers.*'; repeat the flag); a pattern starting with "
                                   "'!' freezes what it matches (e.g. '!transformer.token_embeddings.*', the "
                                   "embedding shared with the output head). Default: every parameter; each pattern "
                                   "must match at least one")
    # LoRA
    lora_r: int = opt(32, "LoRA rank", minimum=1)
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --use-rslora)",
                         minimum=1)
    lora_dropout: float = opt(0.1, "dropout on the LoRA input", minimum=0, below=1)
    fast_lora_dropout: bool = opt(True, "on CPU, draw LoRA dropout masks from 16-bit random numbers (~2x cheaper "
                                        "than PEFT's; p rounded to a multiple of 1/65536)")
    fused_lora: bool = opt(True, "add the LoRA update to the frozen layer's output in one addmm (PEFT writes, "
                                 "scales and adds it in three passes; same sum, rounded once)")
    lora_targets: list[str] = opt(TUTORIAL_TARGETS, "module names to adapt (repeat the flag; replaces the default)")
    use_dora: bool = opt(False, "DoRA: weight-decomposed LoRA (the same as --method dora)")
    use_rslora: bool = opt(False, "rank-stabilised LoRA scaling")
    quantize: str = opt("none", "4bit: QLoRA with bitsandbytes (needs a CUDA GPU)", choices=("none", "4bit"))
    # Optimisation
    epochs: float = opt(3.0, "passes over the training data (ignored when --max-steps is set)",
                         minimum=0, maximum=1_000_000)
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1 or 0: run --epochs)", minimum=1,
                         also=(-1, 0))
    batch_size: int = opt(8, "examples per device per micro-batch", minimum=1)
    grad_accum: int = opt(4, "micro-batches per optimizer step", minimum=1)
    lr: float = opt(1e-4, "peak learning rate", above=0)
    lr_scheduler: str = opt("linear", "learning-rate schedule",
                            choices=("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_steps: int = opt(0, "linear warm-up steps", minimum=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", minimum=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", minimum=0)
    device: str = opt("auto", f"where to train: {DEVICE_HELP}; under torchrun each process takes its own GPU "
                              "(LOCAL_RANK)")
    precision: str = opt("auto", "auto = bf16 where the device computes it natively (Ampere+ GPUs, CPUs with "
                                 "AVX-512-BF16/AMX), fp16 with loss scaling on older GPUs, else fp32",
                         choices=("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: str = opt("auto", "recompute activations in backward to save memory. off: keep all; "
                                              "on: selective, keep attention and the narrow projections' outputs, "
                                              "recompute proj_1 and elementwise ops; full: keep only layer inputs "
                                              "(the tutorial's); auto: the first of off, on, full that fits",
                                      choices=("auto", "off", "on", "full"))
    packing: bool = opt(True, "padding-free batches: each micro-batch's examples in one row, attention kept inside "
                              "each example (same results as padded batches, less compute)")
    full_logits: bool = opt(False, "compute logits over the whole vocabulary at every position, as the tutorial "
                                   "does (default: only where a token is supervised, in chunks)")
    attn_implementation: str = opt("sdpa", "attention kernel: sdpa (PyTorch), eager (explicit matmuls, as Apple's "
                                           "code), flex_attention (PyTorch's FlexAttention; GPU only for training), "
                                           "flash_attention_2 / flash_attention_3 (CUDA, with the flash-attn "
                                           "package)",
                                   choices=ATTENTION_CHOICES)
    seed: int = opt(42, "seed for initialisation, data order and dropout", minimum=0,
                    maximum=SEED_MAX)
    distributed: str = opt("ddp", "under torchrun / accelerate launch: ddp (each process a full model), fsdp (shard "
                                  "the frozen base across processes), deepspeed (ZeRO-2; needs deepspeed)",
                           choices=("ddp", "fsdp", "deepspeed"))
    # Validation
    val_size: float = opt(0.0, "hold out this many examples (≥ 1) or this fraction (< 1) for evaluation",
                           minimum=0)
    val_file: str | None = opt(None, "evaluation data (same formats as --data) instead of a split")
    eval_steps: int | None = opt(None, "evaluate every N steps (default or 0: every --save-steps) and at the end",
                                  minimum=1, also=(0,))
    # Outputs
    save_steps: int = opt(600, "write a resumable checkpoint every N optimizer steps", minimum=1)
    save_total_limit: int | None = opt(None, "keep only the newest N checkpoints", minimum=1)
    logging_steps: int = opt(10, "log loss, lr and tokens/s every N steps", minimum=1)
    tensorboard: bool = opt(False, "also write TensorBoard logs (OUTPUT_DIR/tensorboard)")
    resume: str | None = opt(None, "continue from a checkpoint: 'auto' (the newest in OUTPUT_DIR) or its path")
    nan_policy: str = opt("stop", "a NaN/inf loss or gradient: stop before it reaches the weights, or skip that "
                                  "optimizer step and go on", choices=("stop", "skip-step"))
    overwrite: bool = opt(False, "allow writing into an OUTPUT_DIR that already holds another run")
    dry_run: bool = opt(False, "load config, tokenizer and data, build the model on the meta device, print the "
                               "plan and exit (no weights allocated)")

    def __post_init__(self):
        check_ranges(self)  # the ranges declared above, for options built in Python rather than resolved
        if self.max_steps <= 0 and self.epochs <= 0:
            raise OptionsError("option 'epochs' must be positive unless 'max_steps' is set")
        preference = self.method in PREFERENCE_METHODS
        if not preference and self.tune != "lora":
            raise OptionsError(f"--tune chooses what --method dpo/orpo trains; for supervised training use --method "
                               f"{self.tune}")
        if not preference and self.init_adapter:
            raise OptionsError("--init-adapter starts preference tuning (--method dpo/orpo) from an adapter")
        if self.use_dora:  # the older flag, kept as an alias of --method dora (of --tune dora under dpo/orpo)
            if (self.tune if preference else self.method) == "full":
                raise OptionsError("--use-dora means --method dora; it cannot be combined with --method full")
            if preference:
                self.tune = "dora"
            else:
                self.method = "dora"
        # An input alias only: written back as false, so that a saved config.yaml read with --config or --resume
        # cannot turn a --method given on the command line back into dora.
        self.use_dora = False
        if preference and self.tune == "full" and self.init_adapter:
            raise OptionsError("--init-adapter starts from a LoRA adapter: use it with --tune lora or dora (to "
                               "preference-tune a full fine-tune, give its output directory as --model)")
        if self.trained == "full":
            if self.quantize != "none":
                raise OptionsError("--quantize 4bit trains LoRA adapters on a frozen quantized base; --method full "
                                   "trains the weights themselves and cannot quantize them")
        elif self.trainable:
            raise OptionsError("--trainable chooses the weights --method full trains; LoRA adapts the modules "
                               "named by --lora-targets")

    @property
    def trained(self) -> str:
        """What the run trains: lora, dora or full (``--method``, or ``--tune`` under ``--method dpo/orpo``)."""
        return self.tune if self.method in PREFERENCE_METHODS else self.method
