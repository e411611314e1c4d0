"""``elmtune chat``: streamed replies, conversation memory, settings, reset and quit."""

from __future__ import annotations

from elmtune.chat import ChatSession, chat_loop
from elmtune.inference import SamplingOptions, complete, load_pipeline
from tests.helpers import train_tiny_adapter


def test_session_streams_the_same_answer_as_generate_and_remembers(tmp_path):
    _, adapter = train_tiny_adapter(tmp_path)
    pipeline = load_pipeline(adapter=str(adapter))
    session = ChatSession(pipeline, SamplingOptions(max_new_tokens=6, repetition_penalty=1.0))
    pieces = list(session.reply("say"))
    expected = complete(pipeline, [pipeline.render("say")], SamplingOptions(max_new_tokens=6, repetition_penalty=1.0))
    assert "".join(pieces).strip() == expected[0].output.strip()
    first_turn = list(session.history)
    assert first_turn[-1] == pipeline.tokenizer.eos_id  # the turn is closed with eos in the context
    list(session.reply("say"))
    assert session.history[: len(first_turn)] == first_turn and len(session.history) > len(first_turn)
    session.reset()
    assert session.history == []
    assert session.set("temperature", "0.7") == "temperature = 0.7" and session.sampling.temperature == 0.7


def test_loop_commands(tmp_path):
    _, adapter = train_tiny_adapter(tmp_path)
    session = ChatSession(load_pipeline(adapter=str(adapter)), SamplingOptions(max_new_tokens=4))
    lines = iter(["say", "/set top_k 5", "/set bogus 1", "/reset", "/settings", "/quit", "never read"])
    written: list[str] = []
    assert chat_loop(session, read=lambda prompt: next(lines), write=written.append) == 0
    text = "".join(written)
    assert "elm> " in text and "top_k = 5" in text and "unknown setting 'bogus'" in text
    assert "(conversation reset)" in text and "top_k=5" in text
    assert next(lines) == "never read"  # /quit ended the loop
