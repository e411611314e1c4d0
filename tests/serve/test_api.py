"""The server driven by the official ``openai`` client, plus the tutorial's ``POST /``."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from elmtune.inference import SamplingOptions, complete, load_pipeline
from tests.serve.conftest import submitted_prompts


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_models_lists_base_and_adapters(server):
    ids = [m.id for m in client(server).models.list().data]
    assert ids == ["base", "alpha", "beta"]


def test_chat_completion_matches_local_generation_per_adapter(server, adapters):
    _, named = adapters
    c = client(server)
    for name in ("alpha", "beta"):
        reply = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "say"}],
                                          temperature=0, max_tokens=8)
        pipeline = load_pipeline(adapter=named[name])
        [local] = complete(pipeline, [pipeline.render("say")], SamplingOptions(max_new_tokens=8, repetition_penalty=1.0))
        assert reply.choices[0].message.content == local.output, name
        assert reply.choices[0].finish_reason == local.finish_reason
        assert reply.usage.completion_tokens == local.completion_tokens
        assert reply.usage.prompt_tokens == local.prompt_tokens and reply.model == name


def test_adapters_really_differ(server):
    c = client(server)
    outputs = {name: c.completions.create(model=name, prompt="say a b<sep>", temperature=0, max_tokens=6).choices[0].text
               for name in ("base", "alpha", "beta")}
    assert len(set(outputs.values())) >= 2, outputs


def test_streaming_chat_and_completions_equal_non_streaming(server):
    c = client(server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "say"}]
    whole = c.chat.completions.create(model="alpha", messages=messages, temperature=0, max_tokens=10)
    chunks = list(c.chat.completions.create(model="alpha", messages=messages, temperature=0, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens

    plain = c.completions.create(model="base", prompt="hello", temperature=0, max_tokens=12)
    streamed = list(c.completions.create(model="base", prompt="hello", temperature=0, max_tokens=12, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == plain.choices[0].text
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 12


def test_stop_and_seed(server):
    c = client(server)
    long = c.completions.create(model="base", prompt="x", temperature=0, max_tokens=20).choices[0].text
    stop = long[len(long) // 2:][:2]
    cut = c.completions.create(model="base", prompt="x", temperature=0, max_tokens=20, stop=[stop]).choices[0]
    assert cut.text == long[: long.index(stop)] and cut.finish_reason == "stop"
    sampled = [c.completions.create(model="base", prompt="x", temperature=1.0, top_p=0.9, seed=5, max_tokens=10)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("body, status, fragment", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "limit of 64"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "../../etc/passwd"}, 404, "does not exist"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": " "}]}, 400, "messages.0.content: Value error, must hold text"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x " * 3000}]}, 400, "at most"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, fragment):
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_openai_client_sees_errors_as_exceptions(server):
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model="base", prompt="hi", max_tokens=0)


def test_body_too_large_is_413(server):
    response = httpx.post(server.url + "/v1/completions", content=b"{" + b" " * (2 << 20) + b"}",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413 and "error" in response.json()

    def chunked(body: bytes):  # a generator body: sent with Transfer-Encoding: chunked, no Content-Length
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]

    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    response = httpx.post(server.url + "/v1/completions", content=chunked(big),
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413 and "error" in response.json()
    small = json.dumps({"prompt": "say", "max_tokens": 2}).encode()
    response = httpx.post(server.url + "/v1/completions", content=chunked(small),
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200 and response.json()["object"] == "text_completion"


def test_tutorial_endpoint_keeps_its_shape_and_answers_as_local_generation(server, adapters):
    from elmtune.inference import SamplingOptions, generate, load_pipeline

    response = httpx.post(server.url + "/", json={"prompt": "say"}, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"response", "status", "time"}
    assert len(body["time"]) == 19  # "%Y-%m-%d %H:%M:%S", as the tutorial
    # greedy with the tutorial's repetition penalty 1.2 and the server's default 16 tokens; with two adapters
    # served, a request naming no model gets the base model (alpha's template, as the server uses)
    base, named = adapters
    pipeline = load_pipeline(model=str(base), adapter=named["alpha"])
    with pipeline.model.disable_adapter():
        local = generate(pipeline, ["say"], sampling=SamplingOptions(max_new_tokens=16, repetition_penalty=1.2))
    assert body["response"] == local[0].output


def test_alpaca_adapters_keep_their_prompt_ids_bit_for_bit(server):
    """Adapters trained on alpaca records under openelm-sep: the tutorial's POST / and one-turn chats give the
    ids they always had (bos + the prompt template's text in one piece), and conversations the ids the old
    turn-by-turn rendering gave, which the openelm chat template reproduces."""
    tok = server.state.tokenizer
    bos, eos = [tok.bos_id], tok.eos_id

    def ids(text):
        return tok.encode([text])[0]

    conversations = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "say"}],
                     [{"role": "user", "content": "say"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "say b"}],
                     [{"role": "user", "content": "say"}, {"role": "assistant", "content": "a b"}]]  # continued
    with submitted_prompts(server) as seen:
        assert httpx.post(server.url + "/", json={"prompt": "say a", "max_new_tokens": 2}).status_code == 200
        for messages in conversations:
            client(server).chat.completions.create(model="alpha", messages=messages, max_tokens=2, temperature=0)
    assert seen == [bos + ids("say a<sep>"), bos + ids("be brief\nsay<sep>"),
                    bos + ids("say<sep>") + ids("a") + [eos] + ids("say b<sep>"), bos + ids("say<sep>") + ids("a b")]


def test_health_and_chat_page(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["models"] == ["base", "alpha", "beta"]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "elmtune chat" in page.text and "/v1/chat/completions" in page.text


def test_api_key_guards_every_api_route(keyed_server):
    url = keyed_server.url
    calls = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
             ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
             ("POST", "/", {"prompt": "x", "max_new_tokens": 2})]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.request(method, url + path, json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert ok.status_code == 200, path
    assert httpx.get(url + "/health").status_code == 200  # liveness stays open
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, "wrong").models.list()
    assert [m.id for m in client(keyed_server, "s3cret").models.list().data][0] == "base"
