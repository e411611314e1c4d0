"""``elmtune bench train`` and ``elmtune bench generate``: measured figures, not claims.

``bench train`` runs, in one invocation and each in its own process (so peak memory is its own), the same
LoRA recipe on the same examples in the same order, four ways:

* **tutorial** — our model driven exactly as the tutorial drives Apple's: padded batches (pad = eos, labels -100),
  full-vocabulary fp32 logits at every position, full gradient checkpointing, eager attention with key/value heads
  repeated (``repeat_interleave``), PEFT's own LoRA dropout;
* **elmtune** — the defaults of ``elmtune train``: packed rows, logits only at supervised positions, SDPA with
  native GQA, the cheaper CPU LoRA dropout mask, the LoRA update fused into one addmm, gradient checkpointing
  ``auto``;
* **elmtune + ckpt** — the same with ``--gradient-checkpointing on`` (selective checkpointing);
* **elmtune + full ckpt** — the same with ``--gradient-checkpointing full`` (the tutorial's kind).

It prints supervised tokens/s (and the ratio to the tutorial path), peak memory (and the ratio), the mean loss
per supervised token, and model-FLOPs utilisation: useful FLOPs = 4 × matmul parameters per non-pad token
(forward + input-gradient backward; frozen weights need no weight gradient), divided by this machine's matmul
peak measured in the same run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .options import opt

# The read-only data folder beside the checkout (ELMTUNE_SHARED points elsewhere, e.g. a copy carried to a GPU host).
SHARED = Path(os.environ.get("ELMTUNE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
PATHS = {
    "tutorial": dict(packing=False, full_logits=True, gradient_checkpointing="full", attn_implementation="eager",
                     fast_lora_dropout=False, fused_lora=False),
    "elmtune": dict(),
    "elmtune + ckpt": dict(gradient_checkpointing="on"),
    "elmtune + full ckpt": dict(gradient_checkpointing="full"),
}

# The tutorial's script runs with PyTorch's defaults; elmtune sets huge-page allocation and a smaller oneDNN cache
# when imported (see elmtune/__init__.py), so the tutorial path is run with the defaults restored.
PATH_ENV = {"tutorial": {"THP_MEM_ALLOC_ENABLE": "0", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}}


@dataclass
class BenchTrainOptions:
    model: str = opt("openelm-270m", "preset (random init) or checkpoint directory")
    tokenizer: str | None = opt(None, "tokenizer (default: ../shared's Llama-2 tokenizer)")
    data: str | None = opt(None, "records (default: ../shared's alpaca-chinese part_0; generated when absent)")
    steps: int = opt(4, "optimizer steps per path; the first is warm-up and not timed", minimum=2)
    batch_size: int = opt(8, "examples per micro-batch (the tutorial's 8)", minimum=1)
    grad_accum: int = opt(2, "micro-batches per step (the tutorial uses 4; fewer keeps the bench short)",
                         minimum=1)
    precision: str = opt("auto", "the precision of both paths. auto: the device's native one, as `elmtune train` "
                         "picks it — bf16 (the tutorial's) on GPUs from Ampere on and on CPUs with AVX-512-BF16 or "
                         "AMX, fp16 on older GPUs, fp32 on other CPUs (their bf16 matmuls run in software: ~100x "
                         "slower than fp32 on an AVX2 CPU)", choices=("auto", "bf16", "fp16", "fp32"))
    device: str = opt("auto", "where to train: auto (the GPU if there is one), cuda, mps or cpu",
                      choices=("auto", "cuda", "mps", "cpu"))
    paths: list[str] = opt(list(PATHS), "which paths to run (repeatable)")


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", repeats: int = 8) -> float:
    """Measured FLOP/s of a square matmul on ``device`` (the ceiling for MFU): 2,048² on a CPU, 8,192² on a GPU
    (smaller products there measure kernel launches, not the tensor cores)."""
    device = torch.device(device)
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work, so a timer measures it (CPU work is synchronous)."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def matmul_parameters(model) -> int:
    """Weights used in matmuls per token: every Linear, plus the output head (the embedding when tied)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = 0 if model.lm_head is not None else model.transformer.token_embeddings.weight.numel()
    return linear + head


def _generated_records(path: Path, n: int = 512) -> None:
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta apple river stone cloud light sound green blue".split()
    records = [{"en_instruction": "Write " + " ".join(rng.choices(words, k=rng.randint(3, 12))),
                "en_input": "", "en_output": " ".join(rng.choices(words, k=rng.randint(5, 120)))} for _ in range(n)]
    path.write_text(json.dumps(records))


def run_path(name: str, options: BenchTrainOptions, workdir: Path) -> dict:
    """One path, in this process: train ``steps`` steps through the real recipe and measure."""
    from transformers import TrainerCallback

    from .training import TrainOptions, setup
    from .training.checkpointing import checkpointing_mode

    overrides = PATHS[name]
    train_options = TrainOptions(
        model=options.model, tokenizer=options.tokenizer, data=[options.data], output_dir=str(workdir / "run"),
        overwrite=True, batch_size=options.batch_size, grad_accum=options.grad_accum, max_steps=options.steps,
        lr=1e-4, precision=options.precision, device=options.device, save_steps=10**6, logging_steps=1, seed=0,
        **overrides)
    run = setup(train_options)
    if name == "tutorial":  # the tutorial's script hands no freed memory back to the OS
        from .training.recipe import ReleaseFreedMemory

        run.trainer.remove_callback(ReleaseFreedMemory)
    micro: list[tuple[int, int, int]] = []  # per micro-batch: (non-pad tokens, supervised tokens, computed tokens)
    collate = run.trainer.data_collator

    def counting(features):
        batch = collate(features)
        labels = batch["labels"]
        real = sum(len(f["input_ids"]) for f in features)
        micro.append((real, int((labels[:, 1:] != -100).sum()), batch["input_ids"].numel()))
        return batch

    run.trainer.data_collator = counting
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            _sync(args.device)
            stamps.append(time.perf_counter())

    run.trainer.add_callback(Clock())
    on_cuda = run.trainer.args.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    run.trainer.train()
    accum = options.grad_accum
    timed = micro[accum:]  # the first optimizer step is warm-up
    seconds = stamps[-1] - stamps[1]
    losses = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
    base = run.model.base_model.model
    peak = (torch.cuda.max_memory_allocated() if on_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"path": name, "seconds": seconds, "tokens": sum(m[0] for m in timed),
            "supervised": sum(m[1] for m in timed), "computed": sum(m[2] for m in timed),
            "losses": losses, "peak_bytes": peak, "matmul_params": matmul_parameters(base),
            "checkpointing": checkpointing_mode(run.model)}


def bench_train(options: BenchTrainOptions) -> dict:
    """Run every path in its own process and print the comparison; returns the figures."""
    with tempfile.TemporaryDirectory(prefix="elmtune-bench-") as tmp:
        tmp = Path(tmp)
        if options.tokenizer is None:
            options.tokenizer = str(SHARED / "data" / "llama2-tokenizer")
        if options.data is None:
            shared = SHARED / "data" / "alpaca-chinese" / "alpaca_chinese_part_0.json"
            if shared.is_file():
                options.data = str(shared)
            else:
                options.data = str(tmp / "generated.json")
                _generated_records(Path(options.data))
        from .device import DTYPES, pick_device, resolve_precision

        if options.tokenizer and not Path(options.tokenizer).exists():
            raise ValueError(f"--tokenizer {options.tokenizer}: not found (the bench reads the Llama-2 tokenizer from "
                             "../shared, or ELMTUNE_SHARED, by default; pass --tokenizer DIR)")
        device = pick_device(options.device)
        options.precision = resolve_precision(options.precision, device)  # one precision for every path
        if device.type == "cpu" and options.precision == "bf16":
            from .hardware import cpu_info

            if not cpu_info().bf16_features:
                print(f"[bench] note: {cpu_info().model} has no bf16 instructions (AVX-512-BF16, AMX-BF16): bf16 "
                      "matmuls run in software here, many times slower than fp32 (--precision auto picks fp32)",
                      flush=True)
        peak_flops = matmul_peak(DTYPES[options.precision], device)
        results = {}
        for name in options.paths:
            print(f"[bench] running the {name!r} path …", flush=True)
            env = {**os.environ, "TQDM_DISABLE": "1", **PATH_ENV.get(name, {})}
            out = subprocess.run([sys.executable, "-m", "elmtune.bench", name, json.dumps(asdict(options)), str(tmp)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"bench path {name!r} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    report(results, peak_flops, options, device)
    return {"peak_flops": peak_flops, "paths": results}


def report(results: dict, peak_flops: float, options: BenchTrainOptions, device: torch.device) -> None:
    from .device import describe
    from .hardware import cpu_info

    ref = results.get("tutorial")
    where = describe(device, torch.float32).rsplit(",", 1)[0]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\nbench train: {options.model} on {where}, {options.precision}, batch {options.batch_size} × accumulation "
          f"{options.grad_accum}, {options.steps - 1} timed steps; matmul peak {peak_flops / 1e12:.3f} TFLOP/s "
          f"(measured now{threads})")
    print(f"CPU: {cpu_info().describe()}")
    print(f"{'path':19} {'sup tok/s':>10} {'ratio':>6} {'tok/s':>8} {'pad %':>6} {'peak GiB':>9} {'ratio':>6} "
          f"{'loss':>8} {'MFU':>6} {'ckpt':>5}")
    for name, r in results.items():
        sup = r["supervised"] / r["seconds"]
        tok = r["tokens"] / r["seconds"]
        mfu = 4 * r["matmul_params"] * tok / peak_flops
        loss = sum(r["losses"]) / len(r["losses"])
        padding = 1 - r["tokens"] / r["computed"]
        ratio = f"{sup / (ref['supervised'] / ref['seconds']):.2f}" if ref else "-"
        mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else "-"
        print(f"{name:19} {sup:>10.1f} {ratio:>6} {tok:>8.1f} {padding:>6.1%} {r['peak_bytes'] / 2**30:>9.2f} "
              f"{mem:>6} {loss:>8.4f} {mfu:>6.1%} {r['checkpointing']:>5}")
    print("loss = mean training loss per supervised token over all steps (same examples, same order on every path)")


@dataclass
class BenchGenerateOptions:
    model: str = opt("openelm-270m", "preset (random init) or checkpoint directory")
    new_tokens: int = opt(64, "tokens to generate per sequence", minimum=1)
    prompt_tokens: int = opt(32, "prompt length", minimum=1)
    dtype: str = opt("bf16", "weight dtype (auto: the device's native one)", choices=("auto", "bf16", "fp16", "fp32"))
    device: str = opt("auto", "cuda, cuda:N, mps or cpu (auto: the GPU if there is one)")


@torch.no_grad()
def bench_generate(options: BenchGenerateOptions) -> dict:
    """Greedy decode tokens/s with the KV cache, batch 1 and batch 8."""
    from .device import describe, pick_device, pick_dtype
    from .models.loading import load_model

    device = pick_device(options.device)
    dtype = pick_dtype(device, options.dtype)
    model = load_model(options.model, dtype=dtype, device=device).eval()
    results = {}
    for batch in (1, 8):
        ids = torch.randint(3, model.config.vocab_size, (batch, options.prompt_tokens), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))
        kwargs = dict(max_new_tokens=options.new_tokens, min_new_tokens=options.new_tokens, do_sample=False,
                      pad_token_id=0, eos_token_id=2)
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=2)
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        _sync(device)
        seconds = time.perf_counter() - start
        results[batch] = batch * options.new_tokens / seconds
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"bench generate: {options.model} on {describe(device, dtype)}, prompt {options.prompt_tokens} tokens, "
          f"{options.new_tokens} new tokens, greedy with KV cache{threads}")
    for batch, rate in results.items():
        print(f"  batch {batch}: {rate:8.1f} tokens/s")
    return results


if __name__ == "__main__":  # one bench path in a fresh process: python -m elmtune.bench NAME OPTIONS_JSON WORKDIR
    import elmtune  # noqa: F401  (registers the model)

    name, raw, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3]) / sys.argv[1].replace(" ", "_")
    result = run_path(name, BenchTrainOptions(**json.loads(raw)), workdir)
    print(json.dumps(result))
