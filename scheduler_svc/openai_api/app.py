"""The FastAPI application: routes, bearer-token check, and the JSON/SSE choice per request.

Every route but ``/health`` requires ``Authorization: Bearer <api_token>`` when the scheduler has
an API token (the same one its gRPC SchedulerService requires). A non-streamed request whose client
disconnects is cancelled like a stream whose client disconnects, so no work outlives its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse

from common.errors import Unauthenticated, Unavailable
from scheduler_svc.openai_api import errors, sse
from scheduler_svc.openai_api.gateway import RequestGateway
from scheduler_svc.openai_api.generation import start
from scheduler_svc.openai_api.models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from scheduler_svc.openai_api.params import chat_job, check_model, completion_job

T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
DISCONNECT_POLL_S = 0.5
# Every error a route can answer, documented in OpenAI's shape (FastAPI's 422 is never sent).
_ERRORS = {
    400: "invalid request (invalid_request_error)",
    401: "missing or wrong API key (invalid_api_key)",
    404: "unknown model (model_not_found)",
    429: "waiting queue full (rate_limit_exceeded)",
    500: "internal error or the worker failed the request (server_error)",
    503: "no healthy worker, or the scheduler is stopping (service_unavailable)",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()
}
# ``stream: true`` answers 200 with server-sent events instead of the JSON body.
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the result, or with stream: true its chunks as server-sent events",
          "content": {"text/event-stream": {}}},
    **ERROR_RESPONSES,
}  # fmt: skip


def build_app(gateway: RequestGateway, api_token: str = "") -> FastAPI:
    app = FastAPI(title="LayerKV OpenAI-compatible API", version="1", docs_url=None, redoc_url=None)
    errors.install(app)

    async def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        if not api_token:
            return
        scheme, _, supplied = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            supplied.strip().encode(), api_token.encode()
        ):
            raise Unauthenticated("missing or wrong API key: send 'Authorization: Bearer <api token>'")

    auth = [Depends(authorized)]

    @app.get("/health", responses={503: ERROR_RESPONSES[503]})
    async def health() -> JSONResponse:
        state = gateway.health()
        if not state.serving:
            return errors.response_of(Unavailable(f"not serving: {state.reason}"))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=auth, responses=ERROR_RESPONSES)
    async def models() -> ModelList:
        cards = [ModelCard(id=m.id, created=0, max_model_len=m.max_model_len) for m in gateway.models()]
        return ModelList(data=cards)

    @app.get("/v1/models/{model_id:path}", dependencies=auth, responses=ERROR_RESPONSES)
    async def model(model_id: str) -> ModelCard:
        for m in gateway.models():
            if m.id == model_id:
                return ModelCard(id=m.id, created=0, max_model_len=m.max_model_len)
        raise errors.ApiError(errors.ErrorKind(404, "invalid_request_error", "model_not_found"),
                              f"the model {model_id!r} does not exist", "model")  # fmt: skip

    @app.post("/v1/completions", dependencies=auth, response_model=None, responses=GENERATION_RESPONSES)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> CompletionResponse | StreamingResponse:
        meta = sse.Meta.new("cmpl", check_model(gateway, body.model))
        events = await start(gateway, completion_job(body, gateway))
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(sse.completion_stream(meta, events, usage))
        text, outcome = await _unless_disconnected(request, sse.collect(events))
        return sse.completion_body(meta, text, outcome)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None, responses=GENERATION_RESPONSES)
    async def chat(
        body: ChatCompletionRequest, request: Request
    ) -> ChatCompletionResponse | StreamingResponse:
        meta = sse.Meta.new("chatcmpl", check_model(gateway, body.model))
        events = await start(gateway, chat_job(body, gateway))
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(sse.chat_stream(meta, events, usage))
        text, outcome = await _unless_disconnected(request, sse.collect(events))
        return sse.chat_body(meta, text, outcome)

    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    return app


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """The schema FastAPI builds, less the 422 it documents: validation failures are 400s here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


def _sse(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; cancelled (which cancels the request upstream) if the client leaves."""
    task: asyncio.Task[Any] = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise Unavailable("the client disconnected")
    return task.result()  # type: ignore[no-any-return]
