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
        monkeypatch.setattr(torch.cuda, "synchronize", self._counting(torch.cuda.synchronize, "cuda.synchronize"))
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
    """Before issue 13 this batch made 102 syncs in its 15 decode steps: an ``int()`` per row for its token,
    transformers' "any padding?" check in the forward pass, and a ``nonzero`` plus ``int()`` to trim the mask."""
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


# ---------------------------------------------------------------------------------------- sampling semantics

PROMPTS = ["a b", "hello say x y z", "c", "answer 1 2 10 h", "d e f g"]


def tiny_pipeline(**overrides):
    from elmtune.data import Template
    from elmtune.inference import Pipeline

    return Pipeline(tiny_model(**overrides), word_tokenizer(), Template.parse("openelm-sep"))


def encode(pipeline, text: str) -> list[int]:
    tok = pipeline.tokenizer
    return [tok.bos_id] + tok.encode([text])[0]


@pytest.mark.parametrize("penalty, attention", [(1.0, "sdpa"), (1.3, "sdpa"), (1.3, "eager")])
def test_greedy_batch_equals_complete_alone(penalty, attention):
    """Rows of different lengths in one batch (the decode steps' own padding mask, see Engine._step_mask)."""
    from elmtune.inference import SamplingOptions, complete

    pipeline = tiny_pipeline(attn_implementation=attention)
    assert pipeline.model.config._attn_implementation == attention
    engine = Engine(pipeline.model, pipeline.tokenizer, batch_wait_ms=300)
    try:
        answers = run_all(engine, [(encode(pipeline, p), None, Sampling(max_tokens=10, temperature=0,
                                                                        repetition_penalty=penalty))
                                   for p in PROMPTS])
    finally:
        engine.close()
    assert engine.prefills == 1
    for prompt, (text, info) in zip(PROMPTS, answers):
        [alone] = complete(pipeline, [prompt], SamplingOptions(max_new_tokens=10, repetition_penalty=penalty))
        assert (text, info["finish_reason"], info["completion_tokens"]) == \
               (alone.output, alone.finish_reason, alone.completion_tokens), prompt


def test_a_prepared_cpu_model_decodes_through_the_c_step_with_the_reference_answers(cpu_kernel, stack_steps,
                                                                                    monkeypatch):
    """A 16-bit model prepared for CPU decoding (what load_pipeline serves on a CPU): the engine's steps — rows of
    different lengths, its boolean padding mask — go through the C decode step and answer as the operator path."""
    from elmtune.inference import SamplingOptions, complete
    from elmtune.models import decode, weights16

    pipeline = tiny_pipeline()
    pipeline.model.half()
    assert weights16.prepare(pipeline.model)
    engine = Engine(pipeline.model, pipeline.tokenizer, batch_wait_ms=300)
    try:
        answers = run_all(engine, [(encode(pipeline, p), None, Sampling(max_tokens=10, temperature=0))
                                   for p in PROMPTS])
    finally:
        engine.close()
    assert engine.prefills == 1 and stack_steps and all(stack_steps)
    monkeypatch.setattr(decode, "STACK_STEP", False)  # the reference: every operator in PyTorch
    for prompt, (text, info) in zip(PROMPTS, answers):
        [alone] = complete(pipeline, [prompt], SamplingOptions(max_new_tokens=10, repetition_penalty=1.0))
        assert (text, info["completion_tokens"]) == (alone.output, alone.completion_tokens), prompt


def test_seeded_rows_are_reproducible_whatever_the_batch(monkeypatch):
    model, tok = rambling_model(), word_tokenizer()
    engine = Engine(model, tok, max_batch_size=8, batch_wait_ms=300)
    try:
        mixed = [(ids, None, sampling) for ids, sampling in MIXED]
        first, second = run_all(engine, mixed), run_all(engine, mixed)
        alone = [run_all(engine, [job])[0] for job in mixed if job[2].seed is not None]
        other_seed = run_all(engine, [(ids, None, Sampling(**{**vars(s), "seed": s.seed + 1}))
                                      for ids, _, s in mixed if s.seed is not None])
    finally:
        engine.close()
    seeded = [i for i, (_, s) in enumerate(MIXED) if s.seed is not None]
    assert [first[i] for i in seeded] == [second[i] for i in seeded] == alone
    assert [text for text, _ in other_seed] != [first[i][0] for i in seeded]
    greedy = [i for i, (_, s) in enumerate(MIXED) if s.temperature == 0]
    assert [first[i] for i in greedy] == [second[i] for i in greedy]


def test_temperature_zero_top_k_one_and_tiny_top_p_are_greedy():
    model, tok = rambling_model(), word_tokenizer()
    ids = [1, 5, 6, 7]
    engine = Engine(model, tok, batch_wait_ms=300)
    try:
        answers = run_all(engine, [(ids, None, Sampling(max_tokens=12, temperature=0)),
                                   (ids, None, Sampling(max_tokens=12, temperature=0, seed=4)),
                                   (ids, None, Sampling(max_tokens=12, temperature=1.5, top_k=1)),
                                   (ids, None, Sampling(max_tokens=12, temperature=1.5, top_p=1e-9, seed=2))])
    finally:
        engine.close()
    assert len({text for text, _ in answers}) == 1, answers


def test_sampler_follows_temperature_top_k_and_top_p():
    from elmtune.serve.engine import Sampler

    torch.manual_seed(0)
    n = 20_000
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(n, -1)

    def frequencies(**settings) -> torch.Tensor:
        sampler = Sampler([Sampling(max_tokens=1, **settings)] * n, [None] * n, vocab=4, device=torch.device("cpu"))
        tokens = sampler(logits, torch.zeros(n, 4, dtype=torch.bool))
        return torch.bincount(tokens, minlength=4) / n

    def close(got, expected):
        return torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=0.015)

    assert close(frequencies(temperature=1.0), [0.4, 0.3, 0.2, 0.1])
    assert close(frequencies(temperature=1.0, top_k=2), [4 / 7, 3 / 7, 0, 0])
    assert close(frequencies(temperature=1.0, top_p=0.5), [4 / 7, 3 / 7, 0, 0])  # the smallest set reaching 0.5
    assert close(frequencies(temperature=1.0, top_p=0.75), [4 / 9, 3 / 9, 2 / 9, 0])
    assert close(frequencies(temperature=1.0, top_k=3, top_p=0.6), [4 / 7, 3 / 7, 0, 0])  # top-p after top-k
    flat = probs.pow(1 / 2.0) / probs.pow(1 / 2.0).sum()
    assert close(frequencies(temperature=2.0), flat.tolist())
    assert close(frequencies(temperature=0), [1, 0, 0, 0])
    # a seeded row draws the same whatever it is batched with, and independently of the default generator
    seeded = [Sampling(max_tokens=1, temperature=1.0, seed=11)]

    def draws(rows_before: int) -> list[int]:
        """20 successive tokens of the seeded row placed after ``rows_before`` unseeded ones."""
        settings = [Sampling(max_tokens=1)] * rows_before + seeded
        generator = torch.Generator().manual_seed(11)
        sampler = Sampler(settings, [None] * rows_before + [generator], vocab=4, device=torch.device("cpu"))
        batch = probs.log().expand(rows_before + 1, -1)
        return [sampler(batch, torch.zeros(rows_before + 1, 4, dtype=torch.bool))[-1].item() for _ in range(20)]

    assert draws(0) == draws(1) == draws(5) and len(set(draws(0))) > 1


def test_sampler_repetition_penalty_applies_only_to_seen_tokens():
    from elmtune.serve.engine import Sampler

    logits = torch.tensor([[2.0, 1.9, -1.0, -1.2], [2.0, 1.9, -1.0, -1.2]])
    seen = torch.tensor([[True, False, False, False], [False, False, False, False]])
    sampler = Sampler([Sampling(max_tokens=1, temperature=0, repetition_penalty=1.5)] * 2, [None, None], vocab=4,
                      device=torch.device("cpu"))
    assert sampler(logits, seen).tolist() == [1, 0]  # 2.0 / 1.5 < 1.9 for the row that has seen token 0


# ---------------------------------------------------------------------------------------- adapters

@pytest.fixture(scope="module")
def two_adapter_model(adapters):
    """The tiny base with adapters alpha and beta, in fp32 on the CPU (so both PEFT paths agree exactly)."""
    from elmtune.inference import load_pipeline

    base, named = adapters
    pipeline = load_pipeline(model=str(base), adapter=named["alpha"], dtype="fp32", device="cpu",
                             adapter_name="alpha")
    pipeline.model.load_adapter(named["beta"], adapter_name="beta")
    return pipeline


def test_single_adapter_batches_skip_the_mixed_path_with_the_same_output(two_adapter_model, monkeypatch):
    from peft.tuners.lora.layer import Linear

    mixed_calls = []
    original = Linear._mixed_batch_forward
    monkeypatch.setattr(Linear, "_mixed_batch_forward",
                        lambda self, *a, **k: mixed_calls.append(1) or original(self, *a, **k))
    pipeline = two_adapter_model
    prompts = [encode(pipeline, p) for p in PROMPTS[:3]]
    greedy = Sampling(max_tokens=8, temperature=0)
    engine = Engine(pipeline.model, pipeline.tokenizer, batch_wait_ms=300)

    def batch(adapter, extra=None):
        """The three prompts with ``adapter`` (plus an ``extra`` adapter's row, which makes the batch mixed)."""
        before, prefills = len(mixed_calls), engine.prefills
        jobs = [(ids, adapter, greedy) for ids in prompts] + ([(prompts[0], extra, greedy)] if extra != "-" else [])
        answers = run_all(engine, jobs)
        assert engine.prefills == prefills + 1  # one batch
        return [text for text, _ in answers[:3]], len(mixed_calls) > before

    try:
        alpha, alpha_mixed = batch("alpha", "-")
        base, base_mixed = batch(None, "-")
        beta, beta_mixed = batch("beta", "-")
        again, _ = batch("alpha", "-")  # the adapter layers are back on after the base-only batch
        assert not (alpha_mixed or base_mixed or beta_mixed)
        alpha_via_mix, took_mix = batch("alpha", None)
        assert took_mix
        assert (batch(None, "alpha"), batch("beta", "alpha")) == ((base, True), (beta, True))
    finally:
        engine.close()
    assert alpha == again == alpha_via_mix
    assert len({tuple(alpha), tuple(base), tuple(beta)}) >= 2  # the adapters do change the answers


def test_build_state_passes_dtype_and_device(adapters):
    from elmtune.serve import build_state

    base, named = adapters
    for dtype, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        state = build_state(str(base), {"alpha": named["alpha"]}, dtype=dtype, device="cpu")
        try:
            parameter = next(state.engine.model.get_base_model().parameters())
            assert (parameter.dtype, parameter.device.type) == (expected, "cpu")
        finally:
            state.engine.close()
