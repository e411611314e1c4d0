"""One template from training to serving: adapters trained on multi-turn conversations with a system message,
served and asked through the official ``openai`` client, get exactly the prompt ids training put before the
answer — each adapter with its own saved chat template, ``--chat-template`` overriding them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import openai
import pytest

from elmtune.data import ChatTemplate, render_prompt
from tests.helpers import WORD_CHAT_TEMPLATE, train_chat_adapter, trained_prefix
from tests.serve.conftest import start, submitted_prompts


@pytest.fixture(scope="module")
def chat_adapters(tmp_path_factory):
    """Two adapters trained on the same multi-turn conversations: under the default template (openelm: the word
    tokenizer has none of its own) and under a custom one; (base, {name: path}, the training records)."""
    directory = tmp_path_factory.mktemp("chat-templates")
    base, plain = train_chat_adapter(directory / "openelm")
    _, custom = train_chat_adapter(directory / "custom", chat_template=WORD_CHAT_TEMPLATE)
    records = [json.loads(line) for line in (directory / "openelm" / "chat.jsonl").read_text().splitlines()]
    return base, {"plain": str(plain), "custom": str(custom)}, records


@pytest.fixture(scope="module")
def chat_server(chat_adapters):
    base, named, _ = chat_adapters
    running = start((base, named), max_tokens_limit=16, default_max_tokens=4)
    yield running
    running.stop()


def ask(server, model: str, messages: list[dict]):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=4)


def test_the_training_template_is_saved_with_the_adapter(chat_adapters):
    _, named, _ = chat_adapters
    plain = json.loads((Path(named["plain"]) / "elmtune.json").read_text())
    custom = json.loads((Path(named["custom"]) / "elmtune.json").read_text())
    assert plain["format"] == "auto" and plain["formats"] == {"messages": 32} and plain["train_on"] == "all-assistant"
    assert plain["chat_template"]["name"] == "openelm" and "<sep>" in plain["chat_template"]["source"]
    assert custom["chat_template"] == {"name": "custom", "source": WORD_CHAT_TEMPLATE}


def test_a_two_turn_conversation_gets_the_prompt_the_adapter_was_trained_with(chat_server, chat_adapters):
    """A training conversation (system, user, assistant, user) sent through the openai client: the server feeds
    the model exactly the ids the training code put before that conversation's last answer."""
    _, named, records = chat_adapters
    for record in records[:3]:
        messages = record["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
        with submitted_prompts(chat_server) as seen:
            for name in ("plain", "custom"):
                reply = ask(chat_server, name, messages[:4])
                assert reply.choices[0].finish_reason in ("stop", "length")
        plain, custom = seen
        assert plain == trained_prefix(Path(named["plain"]), messages)
        assert custom == trained_prefix(Path(named["custom"]), messages)
        assert plain != custom  # each adapter with its own template
        assert reply.usage.prompt_tokens == len(custom)
    tokenizer = chat_server.state.tokenizer  # the last conversation's prompts, as text
    assert tokenizer.decode(custom) == "z answer c hi say c d hello z hi say g hello"
    assert render_prompt(messages[:4], tokenizer, "openelm").text == "<s>answer c\nsay c d<sep>z</s>say g<sep>"


def test_streaming_renders_the_same_prompt_and_the_base_model_takes_the_first_adapters(chat_server, chat_adapters):
    _, named, records = chat_adapters
    messages = records[5]["messages"][:4]
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)
    with submitted_prompts(chat_server) as seen:
        list(client.chat.completions.create(model="custom", messages=messages, max_tokens=2, stream=True))
        ask(chat_server, "base", messages)
    assert seen[0] == trained_prefix(Path(named["custom"]), records[5]["messages"])
    assert seen[1] == trained_prefix(Path(named["plain"]), records[5]["messages"])


def test_chat_template_override_at_serve_time(chat_adapters):
    base, named, records = chat_adapters
    server = start((base, named), chat_template="chatml", max_tokens_limit=16)
    try:
        messages = records[0]["messages"][:4]
        with submitted_prompts(server) as seen:
            ask(server, "custom", messages)
            ask(server, "plain", messages)
        expected = render_prompt(messages, server.state.tokenizer, "chatml")
        assert expected.text.startswith("<|im_start|>system\nanswer a<|im_end|>\n")
        assert seen == [expected.input_ids, expected.input_ids]  # both adapters: the override
    finally:
        server.stop()


def test_a_conversation_the_template_cannot_render_is_a_400(chat_server, monkeypatch):
    empty = httpx.post(chat_server.url + "/v1/chat/completions", timeout=30, json={
        "model": "custom", "messages": [{"role": "user", "content": "say"}, {"role": "assistant", "content": " "}]})
    assert empty.status_code == 400 and "messages.1.content: Value error, must hold text" in empty.text
    # a template that refuses a conversation (raise_exception), as Llama-2-chat's refuses roles out of turn
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages here') }}{% endif %}"
    prompter = chat_server.state.prompters["custom"]
    monkeypatch.setitem(chat_server.state.prompters, "custom", dataclasses.replace(
        prompter, chat_template=ChatTemplate("custom", refusing + WORD_CHAT_TEMPLATE)))
    response = httpx.post(chat_server.url + "/v1/chat/completions", timeout=30, json={
        "model": "custom", "messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "say"}]})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {
        "message": "request: the chat template (custom) refuses this conversation: no system messages here",
        "type": "invalid_request_error", "param": "messages", "code": None}
    fine = ask(chat_server, "custom", [{"role": "user", "content": "say"}])
    assert fine.choices[0].finish_reason in ("stop", "length")
