"""Load test of `elmtune serve` (a script, not a unit test): concurrent streaming clients, with and without batching.

Builds a small OpenELM (the demo's shape, random init, eos suppressed so every request generates exactly
--max-tokens tokens) and a random LoRA adapter in a temp dir, starts the real server (uvicorn, loopback) twice —
batching on (--max-batch-size) and one request at a time — and drives each with CLIENTS concurrent streaming
clients × REQUESTS requests (official `openai` async client, half on the base, half on the adapter).
Prints requests/s, tokens/s, p50/p95 latency, time to first token and errors, and the gain of batching.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--requests 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import elmtune  # noqa: F401  (before torch: the allocation settings `elmtune serve` runs with)
import torch


def build(directory: Path) -> tuple[str, str]:
    from peft import LoraConfig, get_peft_model

    from elmtune.demo import build_base_model, make_task, train_tokenizer
    from elmtune.models.loading import load_model
    from elmtune.tokenizer import load_tokenizer

    records, _ = make_task(2000, 10, seed=0)
    train_tokenizer(records, directory / "base")
    build_base_model(len(load_tokenizer(str(directory / "base")).hf), directory / "base", seed=0)
    model = load_model(str(directory / "base"))
    with torch.no_grad():
        model.transformer.token_embeddings.weight[2] = 0.0  # eos logit 0: never the best, so no early stops
    model.save_pretrained(directory / "base")
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                            target_modules=["qkv_proj", "out_proj", "proj_1", "proj_2"]))
    peft.save_pretrained(directory / "adapter")
    return str(directory / "base"), str(directory / "adapter")


def start(base: str, adapter: str, max_batch_size: int):
    import uvicorn

    from elmtune.serve import build_state, create_app

    state = build_state(base, {"tuned": adapter}, tokenizer=base, max_batch_size=max_batch_size,
                        max_tokens_limit=4096)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, state, f"http://127.0.0.1:{port}/v1"


async def drive(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    latencies, first_tokens, errors, tokens = [], [], 0, 0

    async def one_client(c: int):
        nonlocal errors, tokens
        for r in range(requests):
            start = time.perf_counter()
            first = None
            try:
                stream = await client.chat.completions.create(
                    model="tuned" if (c + r) % 2 else "base",
                    messages=[{"role": "user", "content": f"Reverse the order of these words: red cat {c} {r}"}],
                    max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - start
                    if chunk.usage:
                        tokens += chunk.usage.completion_tokens
                latencies.append(time.perf_counter() - start)
                first_tokens.append(first or latencies[-1])
            except Exception as error:  # counted, reported
                errors += 1
                print("error:", type(error).__name__, error)

    began = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - began
    latencies.sort()
    return {"requests": len(latencies), "errors": errors, "seconds": wall, "requests_per_s": len(latencies) / wall,
            "tokens_per_s": tokens / wall, "p50": statistics.median(latencies),
            "p95": latencies[int(0.95 * (len(latencies) - 1))], "ttft_p50": statistics.median(first_tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="sequential requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = build(Path(tmp))
        results = {}
        for label, batch in (("batched", args.max_batch_size), ("one at a time", 1)):
            server, thread, state, url = start(base, adapter, batch)
            try:
                results[label] = asyncio.run(drive(url, args.clients, args.requests, args.max_tokens))
            finally:
                server.should_exit = True
                thread.join(timeout=10)
                state.engine.close()
    print(f"\n{args.clients} concurrent streaming clients × {args.requests} requests, {args.max_tokens} tokens each "
          f"(torch threads: {torch.get_num_threads()})")
    print(f"{'':14} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'TTFT p50':>9}")
    for label, r in results.items():
        print(f"{label:14} {r['requests']:>8} {r['errors']:>6} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['p50']:>7.2f} {r['p95']:>7.2f} {r['ttft_p50']:>9.2f}")
    gain = results["batched"]["requests_per_s"] / results["one at a time"]["requests_per_s"]
    print(f"batching gain: {gain:.2f}× requests/s (measured in this run)")


if __name__ == "__main__":
    main()
