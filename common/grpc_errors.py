"""The one table from ``common.errors`` to gRPC status codes, and its use at the gRPC edge.

Servers install ``ErrorInterceptor`` (or decorate a handler with ``grpc_errors``): a
``LayerKVError`` becomes its status code with the error's message (cut to a size gRPC can carry);
any other exception becomes INTERNAL with a short message and is logged, rate-limited, so
Redis/torch exceptions never reach a client raw. The interceptor also runs the access check
before the request is decoded, and turns an undecodable message into INVALID_ARGUMENT with one
rate-limited log line. Clients turn a failed call back into the same error class with
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
from common.logging_setup import RateLimitedLog

log = logging.getLogger(__name__)

# Status details travel in a trailer; one larger than the peer's metadata limit (8 KiB by
# default) would reach the client as RESOURCE_EXHAUSTED instead of the status sent.
MAX_DETAILS_CHARS = 1024

# What clients can make a server log: one line per bad call at most, a few per window.
bad_input_log = RateLimitedLog(log, burst=10, window_s=10.0)
internal_log = RateLimitedLog(log, burst=5, window_s=60.0)

# Checks a call before its request is decoded; raises Unauthenticated or PermissionDenied.
Authorizer = Callable[[str, grpc.aio.ServicerContext], None]

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
    if code is grpc.StatusCode.INTERNAL:  # a bug: worth a traceback, but never one per call
        internal_log.log(logging.ERROR, "unexpected error in %s: %r", method, exc, exc_info=exc)
        message = f"internal error in {method}: {type(exc).__name__}"
    else:
        message = str(exc) or type(exc).__name__
    await context.abort(code, clip_details(message))


def clip_details(message: str) -> str:
    """``message`` cut to ``MAX_DETAILS_CHARS`` (status details must fit a gRPC trailer)."""
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return message[: MAX_DETAILS_CHARS - 20] + f"… ({len(message)} chars)"


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.peer())
    except Exception:  # a call whose transport is already gone
        return "?"


def admit_call(
    raw: Any, context: grpc.aio.ServicerContext, method: str,
    deserialize: Callable[[bytes], Any] | None, authorize: Authorizer | None,
) -> Any:
    """Access check first, then decode: a refused caller costs no parsing. Both failures are
    logged one line each (rate-limited) and raised as the errors that map to their status."""
    if authorize is not None:
        try:
            authorize(method, context)
        except (errors.Unauthenticated, errors.PermissionDenied) as exc:
            bad_input_log.log(logging.WARNING, "refused %s from %s: %s", method, _peer(context), exc)
            raise
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except Exception as exc:  # protobuf's DecodeError, or invalid UTF-8 in a string field
        size = len(raw) if isinstance(raw, bytes | bytearray) else -1
        bad_input_log.log(
            logging.WARNING, "undecodable %s request (%d bytes) from %s: %s", method, size, _peer(context),
            exc,
        )
        raise errors.InvalidArgument(
            f"the {method} request is not a valid message (bad protobuf encoding or a string field "
            f"that is not UTF-8; {size} bytes)"
        ) from None


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
    """Guards every unary-unary, unary-stream and bidirectional handler of a server.

    Each handler gets its raw request bytes: ``authorize`` (if any) runs first (once per call), then
    each request message is decoded (undecodable → INVALID_ARGUMENT), then the handler runs with
    errors mapped to status.
    """

    def __init__(self, authorize: Authorizer | None = None) -> None:
        self._authorize = authorize
        # method -> (the registered handler, its guarded twin): built once per method, not per
        # call (wrapping costs an inspect and a functools.wraps, twice, on every RPC otherwise)
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(handler, method)
        self._guarded[method] = (handler, guarded)
        return guarded

    def _guard(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserialize, authorize = handler.request_deserializer, self._authorize
        if handler.unary_unary is not None:
            inner: Any = wrap_handler(handler.unary_unary, method)

            async def unary(raw: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    request = admit_call(raw, context, method, deserialize, authorize)
                except Exception as exc:  # a refusal, an undecodable request, or a bug in the check
                    await abort_with(context, exc, method)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=None, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream: Any = wrap_handler(handler.unary_stream, method)

            async def stream(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    request = admit_call(raw, context, method, deserialize, authorize)
                except Exception as exc:  # a refusal, an undecodable request, or a bug in the check
                    await abort_with(context, exc, method)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=None, response_serializer=handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_bidi: Any = wrap_handler(handler.stream_stream, method)

            async def bidi(raws: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    admit_call(None, context, method, None, authorize)  # once, before any message
                except Exception as exc:
                    await abort_with(context, exc, method)

                async def decoded() -> AsyncIterator[Any]:
                    async for raw in raws:  # undecodable: INVALID_ARGUMENT, raised into the handler
                        yield admit_call(raw, context, method, deserialize, None)

                async for item in inner_bidi(decoded(), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                bidi, request_deserializer=None, response_serializer=handler.response_serializer
            )
        return handler  # client-streaming methods (none here) are not guarded
