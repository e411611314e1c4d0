"""The FastAPI application and how to run it (``elmtune serve``)."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .routes import api, public
from .state import APIError, ServerState

log = logging.getLogger("elmtune.serve")


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(APIError(status, message, type, param, code).body(), status_code=status)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body over {limit} bytes", code="request_too_large")


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="elmtune", version=__version__,
                  description="OpenELM (+ LoRA adapters) behind the tutorial's API and an OpenAI-compatible API.")
    app.state.elmtune = state

    @app.middleware("http")
    async def limit_body(request: HTTPRequest, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > state.max_body_bytes:
                return _too_large(state.max_body_bytes)
        elif request.method in ("POST", "PUT", "PATCH"):  # chunked: count what arrives, stop at the limit
            body = bytearray()
            async for piece in request.stream():
                body += piece
                if len(body) > state.max_body_bytes:
                    return _too_large(state.max_body_bytes)
            request._body = bytes(body)  # Starlette hands a read body on to the route
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, error: StarletteHTTPException):
        response = _error(error.status_code, str(error.detail))
        response.headers.update(error.headers or {})
        if error.status_code == 405:  # Allow: every method of every route on this path, not just the first
            methods = {m for route in app.routes if getattr(route, "path", None) == request.url.path
                       for m in getattr(route, "methods", ()) or ()}
            response.headers["Allow"] = ", ".join(sorted(methods - {"HEAD"}))
        return response

    @app.exception_handler(Exception)
    async def crashed(_: HTTPRequest, error: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(error).__name__}", type="server_error")

    app.include_router(api)
    app.include_router(public)
    app.openapi = lambda: _openapi_with_limits(app, state)
    return app


def _openapi_with_limits(app: FastAPI, state: ServerState) -> dict:
    """The generated OpenAPI document, with this server's token limits written into the request schemas."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.get("components", {}).get("schemas", {})
        for model, field in (("CompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_tokens"),
                             ("TutorialRequest", "max_new_tokens")):
            prop = components.get(model, {}).get("properties", {}).get(field, {})
            for option in prop.get("anyOf", [prop]):
                if option.get("type") == "integer":
                    option["maximum"] = state.max_tokens_limit
        app.openapi_schema = schema
    return app.openapi_schema


def build_state(model: str | None, adapters: dict[str, str], tokenizer: str | None = None,
                template: str | None = None, api_key: str | None = None, max_batch_size: int = 16,
                device: str | None = "auto", dtype: str | None = "auto", chat_template: str | None = None,
                **limits) -> ServerState:
    """Load the base model once, attach every named adapter (PEFT multi-adapter), start the engine.

    Each adapter renders prompts with the templates saved with it (``template`` / ``chat_template`` override
    them for all); the base model with the first adapter's.  ``device`` and ``dtype`` as for
    :func:`elmtune.inference.load_pipeline` (auto: the GPU, in the dtype it computes natively; see
    :mod:`elmtune.device`)."""
    from ..inference import Prompter, load_pipeline, read_metadata
    from .engine import Engine

    names = list(adapters)
    pipeline = load_pipeline(model=model, adapter=adapters[names[0]] if names else None, tokenizer=tokenizer,
                             template=template, dtype=dtype, device=device,
                             adapter_name=names[0] if names else "default", chat_template=chat_template)
    prompters = {None: pipeline.prompter, **({names[0]: pipeline.prompter} if names else {})}
    net = pipeline.model
    for name in names[1:]:
        prompters[name] = Prompter.for_adapter(read_metadata(adapters[name]), pipeline.tokenizer, template,
                                               chat_template)
        net.load_adapter(adapters[name], adapter_name=name)
    net.eval()
    limits.setdefault("max_prompt_tokens", net.config.max_context_length)
    limit = limits.setdefault("max_tokens_limit", 1024)
    limits["default_max_tokens"] = min(limits.get("default_max_tokens", 256), limit)
    base = str(model or pipeline.metadata.get("base_model") or "base")
    base_name = Path(base).name if Path(base).is_dir() else base  # a directory's name, a hub id or a preset
    return ServerState(engine=Engine(net, pipeline.tokenizer, max_batch_size=max_batch_size),
                       tokenizer=pipeline.tokenizer, prompters=prompters, base_name=str(base_name),
                       adapters=list(adapters), api_key=api_key, **limits)


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    try:
        uvicorn.run(create_app(state), host=host, port=port, log_level="info")
    finally:
        state.engine.close()
