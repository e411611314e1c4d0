"""``elmtune chat``: an interactive terminal chat that streams tokens as they are generated.

Each message is rendered with the training template; earlier turns (prompt, answer, eos) stay in the context
until ``/reset``.  Commands: ``/reset``, ``/set NAME VALUE`` (temperature, top_p, top_k, repetition_penalty,
max_new_tokens, seed), ``/settings``, ``/help``, ``/quit`` (or Ctrl-D).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import fields

import torch
from transformers import TextIteratorStreamer

from .inference import Pipeline, SamplingOptions, generation_args

HELP = ("commands: /reset (forget the conversation), /set NAME VALUE (temperature, top_p, top_k, "
        "repetition_penalty, max_new_tokens, seed), /settings, /help, /quit")


class ChatSession:
    """The conversation state and one streamed reply at a time (usable without a terminal, e.g. in tests)."""

    def __init__(self, pipeline: Pipeline, sampling: SamplingOptions | None = None):
        self.pipeline = pipeline
        self.sampling = sampling or SamplingOptions()
        self.history: list[int] = []

    def reset(self) -> None:
        self.history = []

    def set(self, name: str, value: str) -> str:
        kinds = {f.name: f.type for f in fields(SamplingOptions) if f.name != "stop"}
        if name not in kinds:
            raise ValueError(f"unknown setting {name!r}; one of: {', '.join(kinds)}")
        cast = int if "int" in str(kinds[name]) else float
        setattr(self.sampling, name, None if value.lower() == "none" else cast(value))
        return f"{name} = {getattr(self.sampling, name)}"

    def reply(self, message: str):
        """Yield the reply's text piece by piece as it is generated; the turn then joins the history."""
        tok, model = self.pipeline.tokenizer, self.pipeline.model
        s = self.sampling
        head = [tok.bos_id] if tok.bos_id is not None and not self.history else []
        prompt_ids = self.history + head + tok.encode([self.pipeline.render(message)])[0]
        ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
        config, processors = generation_args(s, tok, torch.zeros(1, dtype=torch.long))
        if s.seed is not None:
            torch.manual_seed(s.seed)
        streamer = TextIteratorStreamer(tok.hf, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def run():
            try:
                result["ids"] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               generation_config=config, logits_processor=processors, streamer=streamer)
            except BaseException as error:  # end the stream, or the reader below would wait forever
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if "error" in result:
            raise result["error"]
        new = result["ids"][0, ids.shape[1]:].tolist()
        if tok.eos_id not in new:
            new.append(tok.eos_id)
        self.history = prompt_ids + new[: new.index(tok.eos_id) + 1]


def chat_loop(session: ChatSession, read=input, write=sys.stdout.write) -> int:
    write(f"elmtune chat — {HELP}\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, *args = line[1:].split()
            if command in ("quit", "exit", "q"):
                return 0
            if command == "reset":
                session.reset()
                write("(conversation reset)\n")
            elif command == "set" and len(args) == 2:
                try:
                    write(session.set(*args) + "\n")
                except ValueError as error:
                    write(f"{error}\n")
            elif command == "settings":
                write(", ".join(f"{f.name}={getattr(session.sampling, f.name)}" for f in fields(SamplingOptions)) + "\n")
            else:
                write(HELP + "\n")
            continue
        write("elm> ")
        try:
            for piece in session.reply(line):
                write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            write(" [interrupted]")
        write("\n")
