"""The HTTP API: OpenAI's and vLLM's endpoints over one engine, with its error and auth rules.

Every error is a JSON body ``{"error": {"message", "type", "code"}}`` with one line of text: 400 for
a bad request, a bad adapter folder or a name that looks like a path; 401 without the API key;
403 for runtime loading when it is off; 404 for an unknown model; 429 when the queue is full.
"""

from __future__ import annotations

import hmac
import importlib.resources
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import AdaptuneError
from .engine import QueueFull
from .handlers import Run, ServeState, gather, plan_chat, plan_completion
from .metrics import CONTENT_TYPE
from .protocol import error_body
from .registry import UnknownModel, check_name
from .schemas import ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest
from .streams import chat_response, chat_stream, completion_response, completion_stream

logger = logging.getLogger(__name__)


class Forbidden(AdaptuneError):
    """Runtime adapter loading is off."""


def _error(message: str, status: int, kind: str) -> JSONResponse:
    return JSONResponse(error_body(message, status, kind), status_code=status)


def _one_line_handler(status: int, kind: str):
    """An exception handler answering ``status`` with the exception's first line."""

    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return _error(_one_line(exc), status, kind)

    return handler


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request body")
    return f"{where}: {message}" if where else message


def create_app(state: ServeState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        try:
            yield
        finally:
            state.engine.stop()

    app = FastAPI(title="adaptune serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    _add_error_handlers(app)
    _add_auth(app, state)
    _add_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(_validation_message(exc), 400, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(str(exc.detail), exc.status_code, "invalid_request_error")

    # the most specific class wins (Starlette looks handlers up along the exception's MRO)
    for error, status, kind in ((UnknownModel, 404, "not_found_error"), (Forbidden, 403, "permission_error"),
                                (AdaptuneError, 400, "invalid_request_error"), (QueueFull, 429, "rate_limit_error")):
        app.add_exception_handler(error, _one_line_handler(status, kind))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error(f"internal error: {_one_line(exc)}", 500, "server_error")


def _add_auth(app: FastAPI, state: ServeState) -> None:
    """As vLLM: with an API key, every /v1 path needs ``Authorization: Bearer KEY``; others are open."""
    if not state.api_key:
        return
    expected = f"Bearer {state.api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith("/v1") and request.method != "OPTIONS":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error("a valid API key is needed: Authorization: Bearer <key>", 401, "authentication_error")
        return await call_next(request)


def _add_routes(app: FastAPI, state: ServeState) -> None:
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        page = importlib.resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": _model_cards(state)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        plan = plan_completion(state, body)
        run = Run(state, plan)
        await run.start()
        usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return StreamingResponse(completion_stream(state, run, body.model, body.echo, usage_wanted),
                                     media_type="text/event-stream")
        return _finish(await gather(run, request.is_disconnected),
                       lambda choices: completion_response(state, run, choices, body.model, body.echo))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        plan = plan_chat(state, body)
        run = Run(state, plan)
        await run.start()
        usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return StreamingResponse(chat_stream(state, run, body.model, usage_wanted), media_type="text/event-stream")
        return _finish(await gather(run, request.is_disconnected),
                       lambda choices: chat_response(state, run, choices, body.model))

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        _check_runtime_loading(state)
        check_name(body.lora_name)
        if body.lora_name == state.base_name:
            raise AdaptuneError(f"{body.lora_name!r} is the base model's name")
        await run_in_threadpool(state.registry.load, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        _check_runtime_loading(state)
        check_name(body.lora_name)
        await run_in_threadpool(state.registry.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _finish(choices, build) -> Response:
    if choices is None:  # the client went away
        return Response(status_code=499)
    failed = next((c.error for c in choices if c.error), None)
    if failed:
        return _error(failed, 500, "server_error")
    return JSONResponse(build(choices))


def _check_runtime_loading(state: ServeState) -> None:
    if not state.allow_runtime_loading:
        raise Forbidden("runtime adapter loading is off; start the server with --allow-runtime-loading")


def _model_cards(state: ServeState) -> list[dict]:
    common = {"object": "model", "owned_by": "adaptune", "max_model_len": state.context_length, "permission": []}
    cards = [{"id": state.base_name, "created": state.created, "root": state.base_root, "parent": None, **common}]
    for entry in state.registry.names():
        cards.append({"id": entry.name, "created": entry.created, "root": str(entry.path),
                      "parent": state.base_name, **common})
    return cards
