"""``elmtune chat``: streamed replies, the conversation re-rendered each turn with the adapter's chat template,
a system message, settings, reset and quit."""

from __future__ import annotations

import elmtune.chat
from elmtune.chat import ChatSession, chat_loop
from elmtune.cli import main
from elmtune.inference import SamplingOptions, complete, load_pipeline
from tests.helpers import WORD_CHAT_TEMPLATE, train_chat_adapter, train_tiny_adapter, trained_prefix


def test_session_streams_the_same_answer_as_generate_and_remembers(tmp_path):
    _, adapter = train_tiny_adapter(tmp_path)
    pipeline = load_pipeline(adapter=str(adapter))
    session = ChatSession(pipeline, SamplingOptions(max_new_tokens=6, repetition_penalty=1.0))
    pieces = list(session.reply("say"))
    expected = complete(pipeline, [pipeline.render("say")], SamplingOptions(max_new_tokens=6, repetition_penalty=1.0))
    assert "".join(pieces).strip() == expected[0].output.strip()
    tok = pipeline.tokenizer
    assert session.prompt_ids == [tok.bos_id] + tok.encode(["say<sep>"])[0]  # the first turn: the tutorial's prompt
    answer = session.messages[1]["content"]
    assert session.messages == [{"role": "user", "content": "say"}, {"role": "assistant", "content": answer}]
    list(session.reply("say"))
    # the whole conversation re-rendered (openelm: the first turn closed with eos), then the new turn
    assert session.prompt_ids == ([tok.bos_id] + tok.encode(["say<sep>"])[0] + tok.encode([answer])[0]
                                  + [tok.eos_id] + tok.encode(["say<sep>"])[0])
    assert len(session.messages) == 4
    session.reset()
    assert session.messages == []
    assert session.set("temperature", "0.7") == "temperature = 0.7" and session.sampling.temperature == 0.7


def test_elmtune_chat_keeps_every_turn_in_the_adapters_training_template(tmp_path, monkeypatch):
    """`elmtune chat` on an adapter trained on multi-turn conversations under a custom chat template, driven with
    scripted input: each turn's prompt is the whole conversation (system message, earlier turns, the new user
    turn) exactly as the training code encodes it before an answer."""
    _, adapter = train_chat_adapter(tmp_path, chat_template=WORD_CHAT_TEMPLATE)
    sessions, written, prompts = [], [], []
    lines = iter(["say a b", "say c", "/system answer b", "say d", "/quit"])
    loop = elmtune.chat.chat_loop

    def scripted(session):  # the real loop on the session the command built, reading the lines above
        sessions.append(session)
        reply = session.reply

        def recorded(message):
            yield from reply(message)
            prompts.append(list(session.prompt_ids))

        session.reply = recorded
        return loop(session, read=lambda _: next(lines), write=written.append)

    monkeypatch.setattr(elmtune.chat, "chat_loop", scripted)
    assert main(["chat", "-a", str(adapter), "--system", "answer a", "--max-new-tokens", "3",
                 "--repetition-penalty", "1.0"]) == 0
    [session] = sessions
    assert len(session.messages) == 6, "".join(written)  # three exchanges, none with an empty reply
    user = [m for m in session.messages if m["role"] == "user"]
    answers = [m for m in session.messages if m["role"] == "assistant"]
    system_a, system_b = {"role": "system", "content": "answer a"}, {"role": "system", "content": "answer b"}
    unknown = {"role": "assistant", "content": "x"}  # the answer to come: not part of the prompt
    assert prompts == [trained_prefix(adapter, [system_a, user[0], unknown]),
                       trained_prefix(adapter, [system_a, user[0], answers[0], user[1], unknown]),
                       trained_prefix(adapter, [system_b, user[0], answers[0], user[1], answers[1], user[2], unknown])]
    tok = session.pipeline.tokenizer
    assert tok.decode(prompts[1]) == f"z answer a hi say a b hello {answers[0]['content']} hi say c hello"
    assert "(system message: answer b)" in "".join(written)


def test_loop_commands(tmp_path):
    _, adapter = train_tiny_adapter(tmp_path)
    session = ChatSession(load_pipeline(adapter=str(adapter)), SamplingOptions(max_new_tokens=4))
    lines = iter(["say", "/set top_k 5", "/set bogus 1", "/system be brief", "/system", "/reset", "/settings",
                  "/quit", "never read"])
    written: list[str] = []
    assert chat_loop(session, read=lambda prompt: next(lines), write=written.append) == 0
    text = "".join(written)
    assert "elm> " in text and "top_k = 5" in text and "unknown setting 'bogus'" in text
    assert "(system message: be brief)" in text and "(no system message)" in text and session.system is None
    assert "(conversation reset)" in text and "top_k=5" in text
    assert next(lines) == "never read"  # /quit ended the loop
