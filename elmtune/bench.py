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
                         "AMX, fp16 on older GPUs, fp32 on other CPUs (their bf16 matmuls run in software: ~14x "
                         "slower than fp32 on an AVX2 CPU)", choices=("auto", "bf16", "fp16", "fp32"))
    device: str = opt("auto", "where to train: auto (the GPU if there is one), cuda, mps or cpu",
                      choices=("auto", "cuda", "mps", "cpu"))
    paths: list[str] = opt(list(PATHS), "which paths to run (repeatable)")


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", repeats: int = 8) -> float:
    """Measured FLOP/s of square matmuls on ``device`` (the ceiling for MFU): the fastest single call of
    ``repeats`` at 1,024² and 2,048² on a CPU, 8,192² on a GPU (smaller products there measure kernel launches,
    not the tensor cores).  A peak is a best case: averaged over calls on a shared 2-core CPU it came out ~15%
    low (112 against 130 GFLOP/s), and the training paths' MFU above 100%."""
    device = torch.device(device)
    best = 0.0
    for size in ((1024, 2048) if device.type == "cpu" else (8192,)):
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        _sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


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
    new_tokens: int = opt(64, "tokens to generate per sequence", minimum=2)
    prompt_tokens: int = opt(32, "prompt length", minimum=1)
    dtype: str = opt("auto", "weight dtype (auto: with --gguf, the GGUF's own — f16 → fp16, the same weights; "
                             "else the device's native one — bf16 on Ampere+ GPUs and CPUs with AVX-512-BF16/AMX, "
                             "fp16 on older GPUs, fp32 on other CPUs).  On a CPU, fp16/bf16 weights stay 16-bit and "
                             "compute in fp32 through elmtune's decoding kernel where it runs and pays",
                     choices=("auto", "bf16", "fp16", "fp32"))
    device: str = opt("auto", "cuda, cuda:N, mps or cpu (auto: the GPU if there is one)")
    gguf: str | None = opt(None, "also decode with llama.cpp (llama-cpp-python, the `llama` extra) from this GGUF of "
                                 "the same weights (`elmtune export gguf MODEL --type f16`), interleaved in the same "
                                 "run, and print elmtune's rate over llama.cpp's")
    repeats: int = opt(2, "timed rounds; each round runs every path once, interleaved (the best round is reported, "
                          "the spread printed)", minimum=1)
    reference: bool = opt(True, "also time the reference decode path (a dynamic cache) in the same rounds")


class _Stamps:
    """A stopping criterion that never stops: it stamps the time each new token is ready (one call per token)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_rate(times: list[float], batch: int) -> float:
    """Decode tokens/s from per-token stamps: the tokens after the first over the time they took (the first
    token's time is the prompt's prefill)."""
    return batch * (len(times) - 1) / (times[-1] - times[0])


def _elmtune_run(model, ids: torch.Tensor, new_tokens: int, fast: bool) -> tuple[float, list[int]]:
    """One greedy generation; (decode tokens/s, the first row's new tokens).  ``fast``: the preallocated cache that
    ``generate``, ``chat`` and the server use; else the reference path (a dynamic cache)."""
    from transformers import DynamicCache, StoppingCriteriaList

    from .models.decode import PreallocatedCache

    stamps = _Stamps(ids.device)
    cache = (PreallocatedCache(model.config, reserve=ids.shape[1] + new_tokens) if fast
             else DynamicCache(config=model.config))
    # exactly new_tokens tokens with no end-of-sequence check, as llama.cpp's loop runs: min_new_tokens would add
    # transformers' vocabulary-wide end-of-sequence mask to every step, ~1 ms of a ~35 ms 270M step on a CPU
    out = model.generate(ids, cache=cache, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         eos_token_id=None, stopping_criteria=StoppingCriteriaList([stamps]))
    return decode_rate(stamps.times, ids.shape[0]), out[0, ids.shape[1]:].tolist()


#: A GGUF's weight type → the ``--dtype`` that loads the same weights (``auto`` follows the peer's file).
GGUF_DTYPES = {"f16": "fp16", "bf16": "bf16", "f32": "fp32"}


class LlamaCppPeer:
    """llama.cpp (through llama-cpp-python) decoding a GGUF greedily, timed the same way as elmtune."""

    def __init__(self, path: str, context: int, threads: int):
        try:
            import llama_cpp
        except ImportError:
            raise ImportError("llama-cpp-python is not installed (pip install 'elmtune[llama]'; it compiles llama.cpp, "
                              "several minutes)") from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"--gguf {path}: no such file (write one with `elmtune export gguf MODEL -o "
                                    f"{path} --type f16`)")
        self.llm = llama_cpp.Llama(path, n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=context,
                                   verbose=False)
        self.version = llama_cpp.__version__
        self.file_type = _gguf_file_type(path)

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
        times, tokens = [], []
        self.llm.reset()
        for token in self.llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
        return decode_rate(times, 1), tokens


def _gguf_file_type(path: str) -> str:
    """The GGUF's weight type as llama.cpp names it (f16, f32, q8_0 …), read from its metadata."""
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        field = reader.fields.get("general.file_type")
        value = int(field.parts[field.data[0]][0]) if field is not None else None
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except Exception:  # noqa: BLE001 — a label only
        return "?"


def _agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def bench_generate(options: BenchGenerateOptions) -> dict:
    """Greedy decode tokens/s with the KV cache at batch 1 and 8, the fast path (and the reference one), and
    llama.cpp on a GGUF of the same weights when ``gguf`` is given — all interleaved round by round, so ratios
    come from the same minutes of a (possibly shared) machine."""
    from .device import describe, pick_device, pick_dtype
    from .models.loading import load_model

    device = pick_device(options.device)
    threads = torch.get_num_threads()
    peer, skipped = None, None
    if options.gguf:
        try:
            peer = LlamaCppPeer(options.gguf, options.prompt_tokens + options.new_tokens + 8, threads)
        except ImportError as error:
            skipped = str(error)
    requested = options.dtype
    if requested == "auto" and peer is not None and peer.file_type in GGUF_DTYPES:
        requested = GGUF_DTYPES[peer.file_type]  # the same weights as the peer's: f16 against f16
    dtype = pick_dtype(device, requested)
    model = load_model(options.model, dtype=dtype, device=device).eval()
    arithmetic = ""
    if device.type == "cpu" and dtype != torch.float32:
        from .models.weights16 import prepare

        arithmetic = prepare(model)
        if not arithmetic and requested != options.dtype:  # followed the GGUF, but the kernel is not used here:
            model = model.float()  # the same (16-bit-rounded) weights, in fp32 — not PyTorch's slow 16-bit CPU path
            arithmetic = f"{str(dtype).removeprefix('torch.')} weights in fp32"
    prompts = {batch: torch.randint(3, model.config.vocab_size, (batch, options.prompt_tokens), device=device,
                                    generator=torch.Generator(device=device).manual_seed(0)) for batch in (1, 8)}
    paths = [("elmtune", b, True) for b in (1, 8)] + [("reference", b, False) for b in (1, 8) if options.reference]
    for _, batch, fast in paths:  # warm-up: first-call allocations and kernel choices are not timed
        _elmtune_run(model, prompts[batch][:, :4], 3, fast)
    if peer is not None:
        peer.run(prompts[1][0, :4].tolist(), 3)
    rates: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    for _ in range(options.repeats):
        for name, batch, fast in paths:
            rate, out = _elmtune_run(model, prompts[batch], options.new_tokens, fast)
            rates.setdefault(f"{name} batch {batch}", []).append(rate)
            tokens.setdefault(f"{name} batch {batch}", out)
        if peer is not None:
            rate, out = peer.run(prompts[1][0].tolist(), options.new_tokens)
            rates.setdefault("llama.cpp batch 1", []).append(rate)
            tokens.setdefault("llama.cpp batch 1", out)
    best = {name: max(r) for name, r in rates.items()}
    where = f", {threads} threads" if device.type == "cpu" else ""
    if device.type == "cpu":
        from .hardware import cpu_info

        print(f"CPU: {cpu_info().describe()}")
    how = f" ({arithmetic})" if arithmetic else ""
    print(f"bench generate: {options.model} on {describe(device, dtype)}{how}, prompt "
          f"{options.prompt_tokens} tokens, {options.new_tokens} new tokens, greedy with KV cache{where}; decode "
          f"tokens/s (after the first token), best of {options.repeats} interleaved rounds (all rounds in brackets)")
    for name, rate in best.items():
        label = name if not name.startswith("llama") else f"{name} ({peer.file_type}, llama-cpp-python {peer.version})"
        spread = ", ".join(f"{r:.1f}" for r in rates[name])
        print(f"  {label:50} {rate:8.1f}  [{spread}]")
    fast1, fast8 = best["elmtune batch 1"], best["elmtune batch 8"]
    print(f"  batch 8 / batch 1: {fast8 / fast1:.2f}×")
    result = {"rates": rates, "best": best, "dtype": str(dtype).removeprefix("torch."), "threads": threads}
    if options.reference:
        print("  fast / reference: batch 1 {:.2f}×, batch 8 {:.2f}×".format(
            fast1 / best["reference batch 1"], fast8 / best["reference batch 8"]))
    if peer is not None:
        ratios = [e / p for e, p in zip(rates["elmtune batch 1"], rates["llama.cpp batch 1"])]
        agree = _agreement(tokens["elmtune batch 1"], tokens["llama.cpp batch 1"])
        print(f"  elmtune / llama.cpp at batch 1: {fast1 / best['llama.cpp batch 1']:.2f}× (best against best; "
              f"round by round {', '.join(f'{r:.2f}' for r in ratios)}); greedy tokens agree for the first {agree} "
              f"of {options.new_tokens}")
        result.update(peer_ratio=fast1 / best["llama.cpp batch 1"], round_ratios=ratios, agreement=agree)
    elif skipped:
        print(f"  llama.cpp: skipped — {skipped}")
        result["peer_skipped"] = skipped
    return result


if __name__ == "__main__":  # one bench path in a fresh process: python -m elmtune.bench NAME OPTIONS_JSON WORKDIR
    import elmtune  # noqa: F401  (registers the model)

    name, raw, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3]) / sys.argv[1].replace(" ", "_")
    result = run_path(name, BenchTrainOptions(**json.loads(raw)), workdir)
    print(json.dumps(result))
