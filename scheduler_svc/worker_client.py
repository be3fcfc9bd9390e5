"""The scheduler's gRPC calls into workers: one ``WorkerConnection`` per worker session (Describe,
GetTokenizer, StreamEvents, Dispatch, Abort, Profile, every message converted by ``wire``), and the
``WorkerClient`` protocol the core dispatches through, so it can be tested without gRPC.

Outcomes are typed: a refused dispatch (no room) and a rejected one (bad request) were certainly
not taken; an unsent one never left; one whose outcome is unknown (a timeout after sending) may be
running on the worker, so the caller must treat its attempt id as spent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio

from common.cost_profile import CostProfile
from common.errors import LayerKVError, Unavailable
from common.grpc_errors import error_from_rpc
from common.proto.layerkv.v1 import worker_pb2_grpc
from common.security import open_channel
from common.tokenizer import Tokenizer
from scheduler_svc import wire
from scheduler_svc.worker_events import DispatchCommand, WorkerDescription, WorkerEvent

DISPATCH_TIMEOUT_S = 30.0
ABORT_TIMEOUT_S = 10.0
DESCRIBE_TIMEOUT_S = 10.0
TOKENIZER_TIMEOUT_S = 30.0
# A profile is bounded by the worker's --profile-budget-s, but its first pass always runs (longer
# on a large model).
PROFILE_TIMEOUT_S = 600.0
CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),  # tokenizer.json of large models
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


class DispatchRefused(LayerKVError):
    """The worker has no room now (it did not take the request)."""


class DispatchRejected(LayerKVError):
    """The worker rejected the request as invalid (it never will take it)."""


class DispatchUnsent(LayerKVError):
    """The dispatch never reached the worker (no connection)."""


class DispatchOutcomeUnknown(LayerKVError):
    """The call failed after it was sent: the worker may have taken the request."""


@dataclass(frozen=True)
class ChannelSecurity:
    """How the scheduler dials workers (mutual TLS when ``ca`` is set)."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""
    token: str = ""  # bearer token sent on every call (the workers' --worker-token)


class WorkerConnection:
    """One channel to one worker and the typed calls over it. A failed call raises a
    ``LayerKVError`` (its status translated), except ``dispatch``, whose outcomes are typed above."""

    def __init__(self, address: str, security: ChannelSecurity) -> None:
        self.address = address
        self._channel = open_channel(
            address,
            ca=security.ca,
            cert=security.cert,
            key=security.key,
            server_name=security.server_name,
            options=CHANNEL_OPTIONS,
            token=security.token,
        )
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def describe(self) -> WorkerDescription:
        try:
            reply = await self._stub.Describe(wire.DESCRIBE_REQUEST, timeout=DESCRIBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from err
        return wire.describe_from_proto(reply)

    async def tokenizer(self) -> Tokenizer:
        try:
            reply = await self._stub.GetTokenizer(wire.TOKENIZER_REQUEST, timeout=TOKENIZER_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from err
        return wire.tokenizer_from_proto(reply)

    async def events(self, num_layers: int, silence_limit_s: float) -> AsyncGenerator[WorkerEvent, None]:
        """The worker's StreamEvents, decoded (``num_layers`` of its model, for placements). Ends when
        the worker closes the stream; ``Unavailable`` when it is silent for ``silence_limit_s``."""
        stream = self._stub.StreamEvents(wire.EVENTS_REQUEST)
        messages = stream.__aiter__()
        while True:
            try:
                message = await asyncio.wait_for(messages.__anext__(), silence_limit_s)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError as exc:
                stream.cancel()
                raise Unavailable(
                    f"worker at {self.address} sent no event for {silence_limit_s:.0f} s"
                ) from exc
            except grpc.aio.AioRpcError as err:
                raise error_from_rpc(err) from err
            yield wire.worker_event_from_proto(message, num_layers)

    async def profile(self) -> CostProfile:
        """Re-profile the worker (its new cost model); ``FailedPrecondition`` while it holds requests."""
        try:
            reply = await self._stub.Profile(wire.PROFILE_REQUEST, timeout=PROFILE_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from err
        return wire.profile_from_proto(reply)

    async def dispatch(self, command: DispatchCommand, timeout_s: float = DISPATCH_TIMEOUT_S) -> None:
        try:
            await self._stub.Dispatch(wire.dispatch_to_proto(command), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            message = str(error_from_rpc(err))
            code = err.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise DispatchRefused(message) from err
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise DispatchRejected(message) from err
            raise DispatchOutcomeUnknown(f"{code.name}: {message}") from err

    async def abort(self, worker_request_id: str) -> None:
        try:
            await self._stub.Abort(wire.abort_to_proto(worker_request_id), timeout=ABORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from err


class WorkerClient(Protocol):
    """What the scheduler asks of workers."""

    async def dispatch(self, worker_id: str, command: DispatchCommand) -> None: ...

    async def abort(self, worker_id: str, worker_request_id: str) -> None: ...


class Reachable(Protocol):
    """A worker as the client sees it (a ``WorkerHandle``)."""

    connection: WorkerConnection | None  # of its latest session
    healthy: bool


class Reachables(Protocol):
    """Where the client finds workers by id (the ``WorkerPool``)."""

    def by_id(self, worker_id: str) -> Reachable | None: ...


class GrpcWorkerClient:
    """``WorkerClient`` over the connections of a ``WorkerPool``."""

    def __init__(self, pool: Reachables, dispatch_timeout_s: float = DISPATCH_TIMEOUT_S) -> None:
        self._pool = pool
        self._timeout_s = dispatch_timeout_s

    async def dispatch(self, worker_id: str, command: DispatchCommand) -> None:
        handle = self._pool.by_id(worker_id)
        if handle is None or handle.connection is None:
            raise DispatchUnsent(f"worker {worker_id} is gone")
        await handle.connection.dispatch(command, self._timeout_s)

    async def abort(self, worker_id: str, worker_request_id: str) -> None:
        handle = self._pool.by_id(worker_id)
        if handle is None or handle.connection is None or not handle.healthy:
            return  # a down worker forgets its requests; a returning one reports them and is told
        await handle.connection.abort(worker_request_id)
