"""Concurrency: requests are batched, slow readers and vanished clients block nobody."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch

from elmtune.serve import build_state
from elmtune.serve.engine import Engine, Request, Sampling, run_request
from tests.helpers import tiny_model, word_tokenizer
from tests.serve.conftest import RunningServer


@pytest.fixture(scope="module")
def rambler(tmp_path_factory):
    """A tiny base whose eos logit is always 0 (never the best): it talks until max_tokens."""
    directory = tmp_path_factory.mktemp("rambler")
    model = tiny_model()
    with torch.no_grad():
        model.transformer.token_embeddings.weight[2] = 0.0
    model.save_pretrained(directory)
    word_tokenizer().save(directory)
    return directory


def test_concurrent_streams_are_batched(server, adapters):
    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

        async def one(i):
            stream = await c.chat.completions.create(model=["alpha", "beta", "base"][i % 3], stream=True,
                                                     messages=[{"role": "user", "content": f"say {'abc'[i % 3]}"}],
                                                     temperature=0, max_tokens=12)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

        engine = server.state.engine
        before = engine.steps + engine.prefills
        results = await asyncio.gather(*(one(i) for i in range(12)))
        return results, engine.steps + engine.prefills - before

    results, passes = asyncio.run(main())
    assert len(results) == 12
    tokens = sum(1 + len(r.split()) for r in results)  # a lower bound on the tokens generated
    assert passes < tokens  # requests shared forward passes: fewer passes than one per token
    # each answer equals the same request generated alone, whichever batch (and position in it) it landed in
    from elmtune.inference import SamplingOptions, complete, load_pipeline

    base, named = adapters
    pipelines = {"alpha": load_pipeline(adapter=named["alpha"]), "beta": load_pipeline(adapter=named["beta"]),
                 "base": load_pipeline(model=str(base), adapter=named["alpha"])}
    for i, result in enumerate(results):
        name, message = ["alpha", "beta", "base"][i % 3], f"say {'abc'[i % 3]}"
        pipeline = pipelines[name]
        sampling = SamplingOptions(max_new_tokens=12, repetition_penalty=1.0)
        if name == "base":
            with pipeline.model.disable_adapter():
                [alone] = complete(pipeline, [pipeline.render(message)], sampling)
        else:
            [alone] = complete(pipeline, [pipeline.render(message)], sampling)
        assert result == alone.output, (i, name)


def test_engine_drops_a_cancelled_request_at_the_next_step(rambler):
    tok = word_tokenizer()
    engine = Engine(tiny_model_from(rambler), tok, max_batch_size=4)

    async def main():
        request = Request([1, 5, 6], None, Sampling(max_tokens=5000, temperature=0), asyncio.get_running_loop())
        seen = 0
        async for kind, _ in run_request(engine, request):
            seen += kind == "text"
            if seen == 3:
                break  # the consumer goes away: run_request marks the request cancelled
        deadline = time.time() + 10
        while engine.active and time.time() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert engine.active == 0 and engine.steps < 200  # far fewer than the 5,000 asked for
    engine.close()


def tiny_model_from(directory):
    from elmtune.models.loading import load_model

    return load_model(str(directory)).eval()


def test_slow_and_vanished_streaming_clients_block_nobody(rambler):
    running = RunningServer(build_state(str(rambler), {}, max_tokens_limit=4000, max_batch_size=8))
    try:
        engine = running.state.engine
        body = {"prompt": "a", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=60) as slow:
            lines = slow.iter_lines()
            next(lines)  # read one line, then stall like a slow client
            steps_before = engine.steps
            quick = httpx.post(running.url + "/v1/completions", json={"prompt": "b", "max_tokens": 4}, timeout=60)
            assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 4
            # the quick request joined the running batch: it did not wait for the 4,000-token one to finish ...
            assert engine.steps - steps_before < 100
            # ... which is still streaming
            more = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
            assert more and all('"finish_reason": null' in line for line in more)
        # leaving the `with` closed the stalled connection: the server notices and frees the slot
        deadline = time.time() + 20
        while (engine.active or engine.queued) and time.time() < deadline:
            time.sleep(0.05)
        assert engine.active == 0 and engine.queued == 0
        assert engine.steps < 4000
    finally:
        running.stop()
