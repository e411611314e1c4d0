"""The server on a CUDA GPU: native dtype, answers, greedy parity with ``complete()``, one sync per decode step.

Every test is marked ``gpu``: collected everywhere, skipped with the reason where torch sees no CUDA device
(tests/conftest.py).  Run them with ``pytest -m gpu tests/serve``.
"""

from __future__ import annotations

import threading
import warnings

import httpx
import pytest
import torch

from elmtune.serve import build_state
from elmtune.serve.engine import Engine, Sampling
from tests.helpers import word_tokenizer
from tests.serve.conftest import RunningServer
from tests.serve.test_engine import MIXED, SyncCounter, rambling_model, run_all

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_server(adapters):
    """build_state as ``elmtune serve`` calls it by default (device and dtype auto) on the tiny base + alpha."""
    base, named = adapters
    running = RunningServer(build_state(str(base), {"alpha": named["alpha"]}, max_tokens_limit=64))
    yield running
    running.stop()


def test_build_state_loads_the_native_dtype_on_the_gpu(gpu_server):
    from elmtune.device import cuda_native_bf16

    model = gpu_server.state.engine.model
    parameter = next(model.get_base_model().parameters())
    assert parameter.device.type == "cuda" and gpu_server.state.engine.device.type == "cuda"
    assert parameter.dtype == (torch.bfloat16 if cuda_native_bf16(parameter.device.index) else torch.float16)
    assert all(p.device.type == "cuda" for p in model.parameters())  # the adapters too


def test_chat_completion_on_the_gpu(gpu_server):
    reply = httpx.post(gpu_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "alpha", "messages": [{"role": "user", "content": "say a b"}], "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert isinstance(body["choices"][0]["message"]["content"], str) and body["usage"]["completion_tokens"] > 0


def test_greedy_server_output_equals_complete_on_the_same_pipeline(gpu_server):
    from elmtune.inference import Pipeline, SamplingOptions, complete

    state = gpu_server.state
    pipeline = Pipeline(state.engine.model, state.tokenizer, state.template)
    # one request at a time, then complete() on the same model: the engine is idle meanwhile, and it leaves the
    # adapter it last used active (alpha), or the adapter layers off (after a base request)
    for model in ("alpha", "base"):
        for prompt in ("a b", "hello x y z", "c"):
            reply = httpx.post(gpu_server.url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
            options = SamplingOptions(max_new_tokens=12, repetition_penalty=1.0)
            if model == "base":
                with pipeline.model.disable_adapter():
                    [alone] = complete(pipeline, [prompt], options)
            else:
                [alone] = complete(pipeline, [prompt], options)
            choice = reply["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == (alone.output, alone.finish_reason), (model, prompt)


def test_one_host_sync_per_decode_step_on_cuda(monkeypatch):
    """The conversions counted as on the CPU, plus what CUDA itself reports: with ``set_sync_debug_mode`` every
    synchronising call (a device→host read, a host→device copy from pageable memory, ...) warns."""
    from peft import LoraConfig, get_peft_model

    from elmtune.device import best_dtype

    dtype = best_dtype("cuda")
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=["qkv_proj", "out_proj", "proj_1", "proj_2"])
    tuned = get_peft_model(rambling_model(), lora, adapter_name="alpha").to("cuda", dtype).eval()
    cases = {"a plain model": (rambling_model().to("cuda", dtype), None), "one adapter": (tuned, "alpha"),
             "the base of a PEFT model": (tuned, None)}
    for case, (model, adapter) in cases.items():
        engine = Engine(model, word_tokenizer(), max_batch_size=8, batch_wait_ms=300)
        with monkeypatch.context() as patch:
            counter = SyncCounter(patch, engine)
            warned_in_step: list[int] = []  # the step (1-based) during which each CUDA sync warning came
            patch.setattr(warnings, "showwarning", _sync_warnings_per_step(counter, warned_in_step))
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("always")  # every warning, not once per place
                    answers = run_all(engine, [(ids, adapter, sampling) for ids, sampling in MIXED])
            finally:
                torch.cuda.set_sync_debug_mode(previous)
                engine.close()
        assert all(info and info["completion_tokens"] > 0 for _, info in answers), case
        assert engine.steps >= 8, case
        assert counter.per_step == [1] * engine.steps, (case, counter.where)
        assert counter.outside_prefill == engine.steps, (case, counter.where)
        assert [warned_in_step.count(k) for k in range(1, engine.steps + 1)] == [1] * engine.steps, case


def _sync_warnings_per_step(counter: SyncCounter, warned_in_step: list[int]):
    """A ``warnings.showwarning`` noting the decode step of each CUDA "synchronizing operation" warning (it runs in
    the thread that warned, where the counter's phase says whether a step is running)."""
    def show(message, category, filename, lineno, file=None, line=None):
        if (threading.current_thread().name == "elmtune-engine" and "synchroniz" in str(message)
                and getattr(counter.local, "phase", None) == "step"):
            warned_in_step.append(len(counter.per_step))
    return show
