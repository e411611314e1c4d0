"""HTTP routes: the tutorial's ``POST /``, the OpenAI-compatible ``/v1`` API, health and the chat page."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from importlib.resources import files

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, StreamingResponse

from .engine import Request, Sampling, run_request
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    SamplingFields,
    TutorialRequest,
    TutorialResponse,
    Usage,
)
from .state import APIError, ServerState, get_state, require_api_key

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413)}
STREAMING = {200: {"content": {"text/event-stream": {}}}}

api = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)
public = APIRouter()


def _sampling(body: SamplingFields, state: ServerState, prompt_tokens: int) -> Sampling:
    max_tokens = body.max_tokens or state.default_max_tokens
    if max_tokens > state.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of {state.max_tokens_limit}",
                       param="max_tokens")
    if prompt_tokens > state.max_prompt_tokens:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens; this server accepts at most "
                            f"{state.max_prompt_tokens}", param="messages" if hasattr(body, "messages") else "prompt",
                       code="context_length_exceeded")
    return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    repetition_penalty=body.repetition_penalty, seed=body.seed, stop=list(body.stop or []))


def _request(state: ServerState, body: SamplingFields, encode: Callable[[str | None], list[int]]) \
        -> tuple[Request, str]:
    """The engine request for ``body``: its model resolved, then its prompt ids (``encode(adapter)``)."""
    name, adapter = state.resolve_model(body.model)
    prompt_ids = encode(adapter)
    return Request(prompt_ids, adapter, _sampling(body, state, len(prompt_ids)), asyncio.get_running_loop()), name


def _usage(info: dict) -> Usage:
    return Usage(prompt_tokens=info["prompt_tokens"], completion_tokens=info["completion_tokens"],
                 total_tokens=info["prompt_tokens"] + info["completion_tokens"])


async def _collect(state: ServerState, request: Request) -> tuple[str, dict]:
    pieces, info = [], {}
    async for kind, payload in run_request(state.engine, request):
        if kind == "text":
            pieces.append(payload)
        else:
            info = payload
    return "".join(pieces), info


def _sse(chunks) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@api.get("/v1/models", response_model=ModelList, summary="the base model and every adapter served")
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    return ModelList(data=[ModelCard(id=name, created=state.started) for name in state.model_names])


@api.post("/v1/completions", response_model=CompletionResponse, responses=STREAMING,
          summary="continue a raw text prompt (OpenAI completions)")
async def completions(body: CompletionRequest, state: ServerState = Depends(get_state)):
    request, name = _request(state, body, lambda _: state.encode_raw(body.prompt))
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        text, info = await _collect(state, request)
        return CompletionResponse(id=ident, created=created, model=name, usage=_usage(info),
                                  choices=[CompletionChoice(text=text, finish_reason=info["finish_reason"])])

    async def chunks():
        async for kind, payload in run_request(state.engine, request):
            choice = {"index": 0, "text": payload if kind == "text" else "", "logprobs": None,
                      "finish_reason": None if kind == "text" else payload["finish_reason"]}
            yield {"id": ident, "object": "text_completion", "created": created, "model": name, "choices": [choice]}
            if kind == "done" and body.stream_options and body.stream_options.include_usage:
                yield {"id": ident, "object": "text_completion", "created": created, "model": name, "choices": [],
                       "usage": _usage(payload).model_dump()}

    return _sse(chunks())


@api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAMING,
          summary="answer a conversation with the chat template the adapter was trained with (OpenAI chat completions)")
async def chat_completions(body: ChatCompletionRequest, state: ServerState = Depends(get_state)):
    request, name = _request(state, body, lambda adapter: state.encode_chat(adapter, body.messages))
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        text, info = await _collect(state, request)
        return ChatCompletionResponse(id=ident, created=created, model=name, usage=_usage(info), choices=[
            ChatChoice(message=AssistantMessage(content=text), finish_reason=info["finish_reason"])])

    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    async def chunks():
        yield chunk({"role": "assistant", "content": ""}, None)
        async for kind, payload in run_request(state.engine, request):
            if kind == "text":
                yield chunk({"content": payload}, None)
            else:
                yield chunk({}, payload["finish_reason"])
                if body.stream_options and body.stream_options.include_usage:
                    yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [], "usage": _usage(payload).model_dump()}

    return _sse(chunks())


@api.post("/", response_model=TutorialResponse, summary="the tutorial's API: {prompt} → {response, status, time}")
async def tutorial(body: TutorialRequest, state: ServerState = Depends(get_state)) -> TutorialResponse:
    sampling = SamplingFields(max_tokens=body.max_new_tokens, temperature=0.0, repetition_penalty=1.2)
    request, _ = _request(state, sampling, lambda adapter: state.encode_instruction(adapter, body.prompt))
    text, _ = await _collect(state, request)
    return TutorialResponse(response=text, time=datetime.now().strftime("%Y-%m-%d %H:%M:%S"))


@public.get("/health", response_model=Health, summary="liveness, served models and queue depth")
async def health(state: ServerState = Depends(get_state)) -> Health:
    return Health(models=state.model_names, queued=state.engine.queued, active=state.engine.active)


@public.get("/", response_class=HTMLResponse, summary="a small chat page (static HTML and JavaScript)")
async def chat_page() -> HTMLResponse:
    return HTMLResponse(files("elmtune.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))
