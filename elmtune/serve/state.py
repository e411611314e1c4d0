"""What the routes share: the engine, the tokenizer and template, the served names, limits and the API key."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest

from ..data import Template
from ..tokenizer import Tokenizer
from .engine import Engine


class APIError(Exception):
    """An error answered as OpenAI does: a status code and ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Tokenizer
    template: Template
    base_name: str
    adapters: list[str] = field(default_factory=list)  # names given at start-up; nothing else is ever loaded
    api_key: str | None = None
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1 << 20
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def resolve_model(self, name: str | None) -> tuple[str, str | None]:
        """(served name, adapter or None for the base) for a request's ``model`` field."""
        if name is None:
            return (self.adapters[0], self.adapters[0]) if len(self.adapters) == 1 else (self.base_name, None)
        if name == self.base_name:
            return name, None
        if name in self.adapters:
            return name, name
        raise APIError(404, f"the model {name!r} does not exist; GET /v1/models lists: "
                            f"{', '.join(self.model_names)}", param="model", code="model_not_found")

    def _head(self) -> list[int]:
        return [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []

    def encode_raw(self, text: str) -> list[int]:
        return self._head() + self.tokenizer.encode([text])[0]

    def encode_instruction(self, instruction: str) -> list[int]:
        return self.encode_raw(self.template.prompt(instruction))

    def encode_chat(self, messages) -> list[int]:
        """A conversation as training saw single turns: each user turn rendered with the template, each
        assistant turn as its answer followed by eos.  System messages lead the next user turn (or, at the end,
        stand as the instruction themselves); a final assistant message is continued, not closed."""
        ids, system = self._head(), []
        for n, message in enumerate(messages):
            if message.role == "system":
                system.append(message.content)
            elif message.role == "user":
                ids += self.tokenizer.encode([self.template.prompt("\n".join([*system, message.content]))])[0]
                system = []
            else:
                if system:  # system text before an answer: it was the instruction
                    ids += self.tokenizer.encode([self.template.prompt("\n".join(system))])[0]
                    system = []
                closing = [] if n == len(messages) - 1 else [self.tokenizer.eos_id]
                ids += self.tokenizer.encode([message.content])[0] + closing
        if system:
            ids += self.tokenizer.encode([self.template.prompt("\n".join(system))])[0]
        return ids


def get_state(request: HTTPRequest) -> ServerState:
    return request.app.state.elmtune


async def require_api_key(request: HTTPRequest) -> None:
    """With ``--api-key``, every API route needs ``Authorization: Bearer KEY`` (compared in constant time)."""
    expected = request.app.state.elmtune.api_key
    if expected is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", type="authentication_error",
                       code="invalid_api_key")
