"""What the routes share: the engine, the tokenizer, how each served model renders prompts, the served names,
limits and the API key."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest

from ..data import DataError, Template
from ..inference import Prompter
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
    #: adapter name (None: the base model) → how its prompts are rendered: each adapter with the templates it
    #: was trained with; the base model with the first adapter's (as ``load_pipeline`` loads it)
    prompters: dict[str | None, Prompter]
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

    @property
    def template(self) -> Template:
        """The base model's prompt template."""
        return self.prompters[None].template

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

    def encode_raw(self, text: str) -> list[int]:
        """``/v1/completions``: bos and the text's tokens, no template."""
        return self.prompters[None].plain(text).input_ids

    def encode_instruction(self, adapter: str | None, instruction: str) -> list[int]:
        """The tutorial's ``POST /``: one instruction, rendered as the adapter's training rendered one."""
        try:
            return self.prompters[adapter].instruction(instruction, where="request").input_ids
        except DataError as error:
            raise APIError(400, str(error), param="prompt") from None

    def encode_chat(self, adapter: str | None, messages) -> list[int]:
        """A conversation rendered with the adapter's chat template, exactly as training rendered the turns
        before an answer (:meth:`Prompter.conversation`); a final assistant message is continued."""
        try:
            return self.prompters[adapter].conversation([m.model_dump() for m in messages]).input_ids
        except DataError as error:
            raise APIError(400, str(error), param="messages") from None


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
