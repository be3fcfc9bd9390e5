"""The one table from ``common.errors`` to gRPC status codes, and its use at the gRPC edge.

Servers install ``ErrorInterceptor`` (or decorate a handler with ``grpc_errors``): a
``LayerKVError`` becomes its status code with the error's message; any other exception becomes
INTERNAL with a short message and is logged with its traceback, so Redis/torch exceptions never
reach a client raw. Clients turn a failed call back into the same error class with
``error_from_rpc``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from common import errors

log = logging.getLogger(__name__)

# The single mapping. Order matters only for subclasses: the most specific class is found first
# by walking the exception's MRO.
STATUS_OF: dict[type[errors.LayerKVError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.LayerKVError: grpc.StatusCode.UNKNOWN,
}

# The inverse, for clients; Unsupported maps to INVALID_ARGUMENT and comes back as InvalidArgument.
ERROR_OF: dict[grpc.StatusCode, type[errors.LayerKVError]] = {
    code: cls for cls, code in STATUS_OF.items() if cls is not errors.LayerKVError
}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """Status code of an exception: its error class's entry, INTERNAL for anything else."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def error_from_status(code: grpc.StatusCode, details: str) -> errors.LayerKVError:
    """The error class for a status received from a peer (UNAVAILABLE for transport failures)."""
    cls = ERROR_OF.get(code)
    if cls is None:
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            cls = errors.Unavailable
        else:
            cls = errors.LayerKVError
    return cls(details or code.name)


def error_from_rpc(err: grpc.RpcError) -> errors.LayerKVError:
    """A failed call as a ``LayerKVError`` (``raise error_from_rpc(e) from e``)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_from_status(code, details or "")


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """Abort the call with the status for ``exc`` (always raises)."""
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in %s", method, exc_info=exc)
        message = f"internal error in {method}: {type(exc).__name__}"
    else:
        message = str(exc) or type(exc).__name__
    await context.abort(code, message)


_PASS_THROUGH = (grpc.aio.AbortError, GeneratorExit)

F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(fn: F) -> F:
    """Decorator for one aio handler (coroutine or async generator) mapping errors to status."""
    return wrap_handler(fn, fn.__qualname__)


def wrap_handler(fn: F, name: str) -> F:
    """``fn`` with every error turned into a status; ``name`` is what the log line calls it."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def gen_wrapper(*args: Any) -> AsyncIterator[Any]:
            context = args[-1]
            try:
                async for item in fn(*args):
                    yield item
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                await abort_with(context, exc, name)

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        context = args[-1]
        try:
            return await fn(*args)
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            await abort_with(context, exc, name)

    return wrapper  # type: ignore[return-value]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Applies ``grpc_errors`` to every unary-unary and unary-stream handler of a server."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                wrap_handler(inner, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                wrap_handler(inner_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # streaming-request methods are not used by this project
