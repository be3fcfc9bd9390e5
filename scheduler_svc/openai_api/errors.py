"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``, with the
HTTP status a client library maps to its exception classes.

The project's error classes (``common.errors``) map here in one table, as they map to gRPC codes in
``common.grpc_errors``; request-body validation failures become 400 ``invalid_request_error``
naming the field; anything else is a 500 whose traceback is logged, never sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import errors
from scheduler_svc.openai_api.models import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None


INVALID = ErrorKind(400, "invalid_request_error", None)
# The most specific class is found first by walking the exception's MRO.
KIND_OF: dict[type[errors.LayerKVError], ErrorKind] = {
    errors.InvalidArgument: INVALID,
    errors.NotFound: ErrorKind(404, "invalid_request_error", "not_found"),
    errors.AlreadyExists: ErrorKind(409, "invalid_request_error", "conflict"),
    errors.Unauthenticated: ErrorKind(401, "invalid_request_error", "invalid_api_key"),
    errors.PermissionDenied: ErrorKind(403, "invalid_request_error", "permission_denied"),
    errors.ResourceExhausted: ErrorKind(429, "rate_limit_exceeded", "rate_limit_exceeded"),
    errors.Unavailable: ErrorKind(503, "service_unavailable", "service_unavailable"),
    errors.FailedPrecondition: ErrorKind(503, "service_unavailable", "service_unavailable"),
    errors.LayerKVError: ErrorKind(500, "server_error", "internal_error"),
}
INTERNAL = ErrorKind(500, "server_error", "internal_error")


class ApiError(Exception):
    """An error with its OpenAI shape decided where it is raised (e.g. ``model_not_found``)."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.param, self.code = kind, message, param, code or kind.code


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(INVALID, message, param)


def body_of(exc: BaseException) -> tuple[int, ErrorResponse]:
    """HTTP status and OpenAI error body of any exception."""
    if isinstance(exc, ApiError):
        body = ErrorBody(message=exc.message, type=exc.kind.type, param=exc.param, code=exc.code)
        return exc.kind.status, ErrorResponse(error=body)
    kind = next((KIND_OF[c] for c in type(exc).__mro__ if c in KIND_OF), None)  # type: ignore[index]
    if kind is None:
        log.error("internal error in the HTTP API", exc_info=exc)
        body = ErrorBody(
            message=f"internal error ({type(exc).__name__})", type=INTERNAL.type, code=INTERNAL.code
        )
        return INTERNAL.status, ErrorResponse(error=body)
    return kind.status, ErrorResponse(error=ErrorBody(message=str(exc), type=kind.type, code=kind.code))


def response_of(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    status, body = body_of(exc)
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Route every failure of ``app`` through OpenAI's error shape."""

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = list(exc.errors()) or [{"loc": (), "msg": "invalid request body"}]
        first = problems[0]
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return response_of(invalid(f"the request body is not valid JSON: {reason}"))
        field = _loc(first)[:1]
        if not field:  # the body itself: missing or not an object
            return response_of(invalid(f"the request body must be a JSON object: {first.get('msg', '')}"))
        # A union field fails once per alternative: the deepest failure says most (prompt.0 >= 0).
        same = [p for p in problems if _loc(p)[:1] == field]
        best = max(same, key=lambda p: len(_loc(p)))
        return response_of(invalid(f"{'.'.join(_loc(best))}: {best.get('msg', 'invalid value')}", field[0]))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = ErrorKind(exc.status_code, "invalid_request_error", None)
        headers = dict(exc.headers) if exc.headers else None  # e.g. 405's Allow
        return response_of(ApiError(kind, str(exc.detail)), headers)

    async def on_any(request: Request, exc: Exception) -> JSONResponse:
        return response_of(exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ApiError, on_any)
    app.add_exception_handler(errors.LayerKVError, on_any)
    app.add_exception_handler(Exception, on_any)


def _loc(problem: Any) -> list[str]:
    return [str(p) for p in problem.get("loc", ()) if p != "body"]
