"""Deployment stage: the OpenAI-compatible FastAPI application, built around any `Engine` by `create_app`.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health and the seeds' simple
POST /generate. Errors always have OpenAI's shape {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from contextlib import asynccontextmanager, suppress
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

import tunelab
from tunelab.config.schema import ServeConfig
from tunelab.inference.engine import Engine
from tunelab.serving import handlers
from tunelab.serving import protocol as p
from tunelab.serving.batcher import Batcher, QueueFullError, ShuttingDownError
from tunelab.serving.security import BodyLimitMiddleware, KeyChecker, api_keys

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25
ERRORS = {status: {"model": p.ErrorResponse} for status in (400, 401, 404, 413, 503)}


def create_app(engine: Engine, cfg: ServeConfig | None = None) -> FastAPI:
    """The server for `engine`; generation runs in the batcher's threads, never on the event loop."""
    cfg = cfg or ServeConfig()
    batcher = Batcher(engine, cfg.max_batch_size, cfg.max_queue, cfg.batch_wait_ms / 1000)
    state = handlers.ServeState(engine, cfg, batcher, cfg.model_name or engine.name,
                                handlers.run_system_prompt(engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()  # after uvicorn has let in-flight requests finish (graceful shutdown)

    app = FastAPI(title="tunelab", version=tunelab.__version__, lifespan=lifespan,
                  description=f"OpenAI-compatible API serving `{state.model_name}`.")
    app.state.serve = state
    _add_middleware(app, cfg)
    _add_error_handlers(app)
    _add_routes(app, state, _auth_dependency(KeyChecker(api_keys(cfg))))
    return app


def _add_middleware(app: FastAPI, cfg: ServeConfig) -> None:
    if cfg.cors_origins:  # none by default: a browser page on another origin cannot call the server
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimitMiddleware, limit=cfg.max_body_bytes)  # added last: runs first


# Declared for the OpenAPI schema (tools then know to send a bearer token); KeyChecker does the checking.
_BEARER = HTTPBearer(auto_error=False, description="One of the server's API keys (when it has any).")


def _auth_dependency(checker: KeyChecker):
    async def require_key(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]):
        checker.check(request.headers.get("authorization"))

    return Depends(require_key)


def _error_response(error: p.ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(p.ApiError)
    async def api_error(request: Request, error: p.ApiError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return _error_response(validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return _error_response(p.ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                          code=code))

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, error: QueueFullError):
        return _error_response(p.ApiError(503, f"The server is busy: {error}. Retry after {RETRY_AFTER_S} s.",
                                          type="server_busy", code="queue_full",
                                          headers={"Retry-After": str(RETRY_AFTER_S)}))

    @app.exception_handler(ShuttingDownError)
    async def shutting_down(request: Request, error: ShuttingDownError):
        return _error_response(p.ApiError(503, str(error), type="server_busy", code="shutting_down"))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(p.ApiError(500, f"internal server error: {type(error).__name__}: {error}",
                                          type="server_error"))


def validation_error(error: RequestValidationError) -> p.ApiError:
    """FastAPI's 422 list -> one OpenAI-style 400 naming the first bad field (malformed JSON included)."""
    first = error.errors()[0]
    # pydantic names the union member tried ("str", "list[TextPart]") inside loc; clients know only field names
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _is_type_tag(x)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return p.ApiError(400, f"The request body is not valid JSON ({ctx}).", code="invalid_json")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "required field is missing"
    elif first.get("type") == "model_attributes_type" and loc:  # an item of the body, e.g. "messages": ["hi"]
        message = f"expected a JSON object, got {_json_type(first.get('input'))} {json.dumps(first.get('input'))[:80]}"
        if loc[0] == "messages":
            message += ' (each message is an object like {"role": "user", "content": "hi"})'
    elif first.get("type") == "model_attributes_type":
        message = "the request body must be a JSON object (sent with Content-Type: application/json)"
    where = f"`{param}`: " if param else ""
    return p.ApiError(400, f"{where}{message}", param=param, code="invalid_value")


def _json_type(value) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "an array"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))


async def _respond(request: Request, work: Awaitable):
    """Run a handler, dropping its work if the client hangs up before the answer is ready.

    Starlette does not cancel a handler when its client leaves; without this a request that timed out on the
    client side would still be generated later, while the client's retry waits behind it.
    """
    task = asyncio.ensure_future(work)
    while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
        if await request.is_disconnected():
            task.cancel()  # a request still queued leaves the queue (Batcher.generate)
            with suppress(asyncio.CancelledError):
                await task
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    result = task.result()
    if isinstance(result, p.BaseModel):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers=handlers.SSE_HEADERS)


def _add_routes(app: FastAPI, state: handlers.ServeState, auth) -> None:
    @app.get("/health", response_model=p.Health, tags=["server"])
    async def health() -> p.Health:
        """Liveness and load; needs no API key (for load balancers and probes)."""
        return p.Health(model=state.model_name, queued=state.batcher.queued, running=state.batcher.running)

    @app.get("/v1/models", response_model=p.ModelList, dependencies=[auth], responses=ERRORS, tags=["openai"])
    async def list_models() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=state.model_name, created=p.now())])

    @app.post("/v1/chat/completions", response_model=p.ChatCompletion, dependencies=[auth], tags=["openai"],
              responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(req: p.ChatCompletionRequest, request: Request):
        """Chat with the model; the prompt is rendered with the model's training template."""
        return await _respond(request, handlers.chat_completion(state, req))

    @app.post("/v1/completions", response_model=p.TextCompletion, dependencies=[auth], tags=["openai"],
              responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def completions(req: p.CompletionRequest, request: Request):
        """Continue raw prompt text (no chat template)."""
        return await _respond(request, handlers.text_completion(state, req))

    @app.post("/generate", response_model=p.GenerateResponse, dependencies=[auth], responses=ERRORS,
              tags=["simple"])
    async def generate(req: p.GenerateRequest, request: Request):
        """Answer one Alpaca-style instruction (with optional input)."""
        return await _respond(request, handlers.simple_generate(state, req))
