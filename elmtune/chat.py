"""``elmtune chat``: an interactive terminal chat that streams tokens as they are generated.

The conversation is kept as messages and rendered whole, each turn, with the chat template the adapter was
trained with (``--chat-template`` overrides; :meth:`elmtune.inference.Prompter.conversation`), so the model
sees its earlier turns exactly as training showed them.  Commands: ``/system TEXT`` (the system message;
``/system`` alone removes it), ``/reset``, ``/set NAME VALUE`` (temperature, top_p, top_k, repetition_penalty,
max_new_tokens, seed), ``/settings``, ``/help``, ``/quit`` (or Ctrl-D).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import fields

import torch
from transformers import TextIteratorStreamer

from .inference import Pipeline, SamplingOptions, decode_cache, generation_args

HELP = ("commands: /system TEXT (the system message; /system alone removes it), /reset (forget the "
        "conversation), /set NAME VALUE (temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed), "
        "/settings, /help, /quit")


class ChatSession:
    """The conversation state and one streamed reply at a time (usable without a terminal, e.g. in tests).

    ``messages`` holds the turns so far (user and assistant, OpenAI-style), ``system`` the system message;
    ``prompt_ids`` are the token ids the last reply was generated from."""

    def __init__(self, pipeline: Pipeline, sampling: SamplingOptions | None = None, system: str | None = None):
        self.pipeline = pipeline
        self.sampling = sampling or SamplingOptions()
        self.system = system or None
        self.messages: list[dict] = []
        self.prompt_ids: list[int] = []

    def reset(self) -> None:
        self.messages = []

    def conversation(self, message: str) -> list[dict]:
        """The whole conversation with ``message`` as the next user turn, the system message first."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.messages, {"role": "user", "content": message}]

    def set(self, name: str, value: str) -> str:
        kinds = {f.name: f.type for f in fields(SamplingOptions) if f.name != "stop"}
        if name not in kinds:
            raise ValueError(f"unknown setting {name!r}; one of: {', '.join(kinds)}")
        cast = int if "int" in str(kinds[name]) else float
        setattr(self.sampling, name, None if value.lower() == "none" else cast(value))
        return f"{name} = {getattr(self.sampling, name)}"

    def reply(self, message: str):
        """Yield the reply's text piece by piece as it is generated; the exchange then joins the conversation
        (not when the reply is empty: an empty turn cannot be rendered)."""
        tok, model = self.pipeline.tokenizer, self.pipeline.model
        s = self.sampling
        conversation = self.conversation(message)
        prompt_ids = self.pipeline.chat_prompt(conversation).input_ids  # a bad message fails here, before generating
        ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
        config, processors = generation_args(s, tok, torch.zeros(1, dtype=torch.long))
        if s.seed is not None:
            torch.manual_seed(s.seed)
        streamer = TextIteratorStreamer(tok.hf, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def run():
            try:
                result["ids"] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               generation_config=config, logits_processor=processors, streamer=streamer,
                                               cache=decode_cache(model, ids.shape[1] + s.max_new_tokens))
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
        answer = tok.decode(new[: new.index(tok.eos_id)] if tok.eos_id in new else new)
        self.prompt_ids = prompt_ids
        if answer.strip():
            self.messages += [conversation[-1], {"role": "assistant", "content": answer}]


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
            command, _, rest = line[1:].partition(" ")
            args = rest.split()
            if command in ("quit", "exit", "q"):
                return 0
            if command == "reset":
                session.reset()
                write("(conversation reset)\n")
            elif command == "system":
                session.system = rest.strip() or None
                write(f"(system message: {session.system})\n" if session.system else "(no system message)\n")
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
        turns = len(session.messages)
        try:
            for piece in session.reply(line):
                write(piece)
                sys.stdout.flush()
            if len(session.messages) == turns:
                write("(an empty reply: this exchange is not kept)")
        except KeyboardInterrupt:
            write(" [interrupted]")
        except ValueError as error:  # a message the chat template refuses: say so, keep the conversation
            write(f"[{error}]")
        write("\n")
