"""The engine itself: one host sync per decode step, batched sampling semantics, the single-adapter fast path."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from elmtune.serve.engine import Engine, Request, Sampling, run_request
from tests.helpers import tiny_model, word_tokenizer

ENGINE_THREAD = "elmtune-engine"
#: Everything that makes the host wait for the device: a tensor read back into Python, or an explicit sync.
SYNCING = ("tolist", "item", "__int__", "__bool__", "__float__", "__index__", "nonzero")


class SyncCounter:
    """Counts host syncs in the engine's thread, split into prefill passes and the rest (decode steps, rows
    joining and leaving), plus the count inside each decode step (``per_step``)."""

    def __init__(self, monkeypatch, engine: Engine):
        self.local = threading.local()
        self.outside_prefill = 0
        self.per_step: list[int] = []
        self.where: list[str] = []
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "nonzero", self._counting(torch.nonzero, "torch.nonzero"))
        monkeypatch.setattr(torch.cuda, "synchronize", self._counting(lambda *a, **k: None, "cuda.synchronize"))
        monkeypatch.setattr(engine, "_prefill", self._marking(engine._prefill, "prefill"))
        monkeypatch.setattr(engine, "_step", self._marking(engine._step, "step"))

    def _counting(self, original, name):
        def counted(*args, **kwargs):
            if threading.current_thread().name == ENGINE_THREAD:
                phase = getattr(self.local, "phase", None)
                if phase != "prefill":
                    self.outside_prefill += 1
                    self.where.append(name)
                if phase == "step":
                    self.per_step[-1] += 1
            return original(*args, **kwargs)
        return counted

    def _marking(self, original, phase):
        def marked(*args, **kwargs):
            if phase == "step":
                self.per_step.append(0)
            self.local.phase = phase
            try:
                return original(*args, **kwargs)
            finally:
                self.local.phase = None
        return marked


def rambling_model(**overrides):
    """A tiny model whose eos logit is always 0 (tied embeddings): it rarely stops before max_tokens."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        model.transformer.token_embeddings.weight[2] = 0.0
    return model


async def _collect(engine: Engine, request: Request) -> tuple[str, dict]:
    text, info = [], None
    async for kind, payload in run_request(engine, request):
        if kind == "text":
            text.append(payload)
        else:
            info = payload
    return "".join(text), info


def run_all(engine: Engine, jobs: list[tuple[list[int], str | None, Sampling]]) -> list[tuple[str, dict]]:
    """Submit every job at once (they land in one batch when the engine is idle) and wait for all answers."""
    async def main():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(_collect(engine, Request(ids, adapter, sampling, loop))
                                      for ids, adapter, sampling in jobs))
    return asyncio.run(main())


MIXED = [  # greedy, seeded, top-k/top-p, repetition penalty; different lengths, so rows leave at different steps
    ([1, 5, 6, 7], Sampling(max_tokens=12, temperature=0)),
    ([1, 8], Sampling(max_tokens=16, temperature=0.8, seed=7)),
    ([1, 9, 10, 11, 12, 13], Sampling(max_tokens=9, temperature=1.2, top_k=5, top_p=0.9)),
    ([1, 5], Sampling(max_tokens=14, temperature=0, repetition_penalty=1.3)),
    ([1, 14, 15], Sampling(max_tokens=11, temperature=0.7, top_p=0.8, seed=3, repetition_penalty=1.2)),
]


def test_one_host_sync_per_decode_step(monkeypatch):
    engine = Engine(rambling_model(), word_tokenizer(), max_batch_size=8, batch_wait_ms=300)
    try:
        counter = SyncCounter(monkeypatch, engine)
        answers = run_all(engine, [(ids, None, sampling) for ids, sampling in MIXED])
    finally:
        engine.close()
    assert all(info and info["completion_tokens"] > 0 for _, info in answers)
    assert engine.steps >= 8 and engine.prefills == 1
    # each decode step reads the sampled tokens back once (one .tolist()), and nothing else syncs: not the
    # sampling, not the forward pass, not rows leaving the batch
    assert counter.per_step == [1] * engine.steps, counter.where
    assert counter.outside_prefill == engine.steps, counter.where
