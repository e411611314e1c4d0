"""Request and response bodies: the tutorial's ``POST /`` and the OpenAI-compatible API (the parts we serve)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator

# Unknown fields are ignored (OpenAI clients send some by default).
_LENIENT = ConfigDict(extra="ignore")


def _json_number(value):
    """Numbers must be JSON numbers: no "1" for 1, no true for 1 (1.0 is an integer, as JSON Schema says)."""
    if isinstance(value, (str, bool)):
        raise ValueError("must be a JSON number")
    return value


Int = Annotated[int, BeforeValidator(_json_number)]
Float = Annotated[float, BeforeValidator(_json_number)]
# Constraints inside the Annotated, so they land in the JSON Schema of an optional (`X | None`) field too.
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_json_number)]
Seed = Annotated[int, Field(ge=0, le=2**53), BeforeValidator(_json_number)]  # exact as a JSON double


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody


class StreamOptions(BaseModel):
    model_config = _LENIENT
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    model_config = _LENIENT
    model: str | None = Field(None, description="the base model's id or an adapter name (GET /v1/models)")
    max_tokens: PositiveInt | None = Field(None, description="tokens to generate at most (server default and limit apply)")
    temperature: Float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=0, le=1000, description="extension: sample from the k most likely tokens (0 = all)")
    repetition_penalty: Float = Field(1.0, ge=1.0, le=2.0, description="extension: 1.0 = off")
    seed: Seed | None = None
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                          Field(max_length=4)] | None = Field(
        None, description="up to 4 stop strings")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Int = Field(1, ge=1, le=1, description="only one choice per request is supported")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        return [value] if isinstance(value, str) else list(value or [])


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        ..., description="raw text to continue (or a list holding exactly one string)")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        return value[0] if isinstance(value, list) else value


def _has_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must hold text: an empty turn cannot be rendered with the chat template")
    return value


class ChatMessage(BaseModel):
    model_config = _LENIENT
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, AfterValidator(_has_text), Field(json_schema_extra={"pattern": r"\S"})]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, description="the conversation; a final assistant "
                                                                       "message is continued")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "elmtune"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TutorialRequest(BaseModel):
    """The tutorial's request: ``{"prompt": "..."}`` (the instruction; the training template is applied)."""

    model_config = _LENIENT
    prompt: str
    max_new_tokens: PositiveInt | None = None


class TutorialResponse(BaseModel):
    response: str
    status: int = 200
    time: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: list[str]
    queued: int
    active: int
