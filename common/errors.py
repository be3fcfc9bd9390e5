"""The project's one error vocabulary.

Every failure a client may see is one of these classes; the gRPC edge maps them to status codes
in a single table (``common.grpc_errors``). Torch and Redis exceptions never reach a client raw.
"""

from __future__ import annotations


class LayerKVError(Exception):
    """Base class: a failure with a message meant for the caller."""


class InvalidArgument(LayerKVError):
    """The request itself is wrong (empty prompt, bad sampling values, unknown placement...)."""


class NotFound(LayerKVError):
    """An id or name that does not exist (request id, policy name, worker id, model path)."""


class AlreadyExists(LayerKVError):
    """A resource with this id exists with different content."""


class ResourceExhausted(LayerKVError):
    """A limit was hit: the waiting queue is full, or a dispatch no longer fits a worker."""


class Unavailable(LayerKVError):
    """No healthy worker, or a dependency (Redis, a worker) cannot be reached; retry later."""


class FailedPrecondition(LayerKVError):
    """The system is in a state where this cannot be done (e.g. the worker is draining)."""


class Unauthenticated(LayerKVError):
    """Missing or wrong credentials."""


class PermissionDenied(LayerKVError):
    """Authenticated, but not allowed (e.g. a dispatch from a peer that is not our scheduler)."""


class Unsupported(InvalidArgument):
    """A model or option this build does not support (e.g. an unknown architecture)."""


def quoted(value: str, limit: int = 64) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters of the value.

    Ids and names in messages come from clients; an unbounded one would make the status details
    larger than gRPC's metadata limit, and the client would get RESOURCE_EXHAUSTED instead of the
    status the server meant.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"
