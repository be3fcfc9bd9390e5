"""The scheduler's gRPC calls into workers: one ``WorkerConnection`` per worker session (Describe,
GetTokenizer, StreamEvents, Dispatch and DispatchBatch, Abort, Profile, every message converted by
``wire``), and the ``WorkerClient`` protocol the core dispatches through, so it can be tested
without gRPC (``BatchWorkerClient``: one that also sends a round's dispatches to a worker at once).

Outcomes are typed: a refused dispatch (no room) and a rejected one (bad request) were certainly
not taken; an unsent one never left; one whose outcome is unknown (a timeout after sending) may be
running on the worker, so the caller must treat its attempt id as spent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import grpc
import grpc.aio

from common.cost_profile import CostProfile
from common.errors import LayerKVError, Unavailable
from common.grpc_errors import error_from_rpc
from common.proto.layerkv.v1 import worker_pb2_grpc
from common.security import open_channel
from common.tokenizer import Tokenizer
from scheduler_svc import wire
from scheduler_svc.worker_events import (  # the outcomes are re-exported: callers catch them here
    DispatchCommand,
    DispatchOutcomeUnknown,
    DispatchRefused,
    DispatchRejected,
    DispatchUnsent,
    WorkerDescription,
    WorkerEvent,
)

__all__ = [
    "BatchWorkerClient",
    "ChannelSecurity",
    "DispatchOutcomeUnknown",
    "DispatchRefused",
    "DispatchRejected",
    "DispatchUnsent",
    "GrpcWorkerClient",
    "WorkerClient",
    "WorkerConnection",
]

DISPATCH_TIMEOUT_S = 30.0
# Prompt tokens in one DispatchBatch message at most: under 1 MB even at 5 bytes a token id, well
# inside a worker's 4 MB receive limit (one longer prompt goes alone, as a Dispatch would).
MAX_BATCH_TOKENS = 200_000
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
        self._batches = True  # the worker answers DispatchBatch (until it says UNIMPLEMENTED)

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
        # One watchdog for the whole stream instead of a timeout per message (``wait_for`` made a
        # task for every event). Silence is counted only while we wait for the next message, as a
        # per-message timeout would: a consumer held up by its own work (a commit waiting out a
        # Redis stall) does not make the worker silent. The watchdog, re-armed for what is left,
        # cancels the stream once one wait lasted ``silence_limit_s``.
        loop = asyncio.get_running_loop()
        waiting_since: float | None = None  # when the current wait began; None while consuming
        silent = False
        timer: asyncio.TimerHandle | None = None

        def watch() -> None:
            nonlocal silent, timer
            left = silence_limit_s if waiting_since is None else waiting_since + silence_limit_s - loop.time()
            if left > 0:
                timer = loop.call_later(left, watch)
                return
            silent = True
            stream.cancel()

        timer = loop.call_later(silence_limit_s, watch)
        try:
            while True:
                waiting_since = loop.time()
                try:
                    message = await messages.__anext__()
                except StopAsyncIteration:
                    return
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
                    task = asyncio.current_task()
                    if silent and not (task is not None and task.cancelling()):  # ours, not a stop
                        raise Unavailable(
                            f"worker at {self.address} sent no event for {silence_limit_s:.0f} s"
                        ) from err
                    if isinstance(err, asyncio.CancelledError):
                        raise
                    raise error_from_rpc(err) from err
                waiting_since = None
                yield wire.worker_event_from_proto(message, num_layers)
        finally:
            if timer is not None:
                timer.cancel()

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
            raise _dispatch_error(err) from err

    async def dispatch_many(
        self, commands: Sequence[DispatchCommand], timeout_s: float = DISPATCH_TIMEOUT_S
    ) -> list[LayerKVError | None]:
        """Several dispatches in as few ``DispatchBatch`` calls as fit a message (``chunks``); the
        outcome of each, in order: None when taken, else the error ``dispatch`` would raise. A
        worker without DispatchBatch (an older build) gets one ``Dispatch`` each, concurrently."""
        if not self._batches:
            return await _each(self.dispatch, commands, timeout_s)
        out: list[LayerKVError | None] = []
        for chunk in chunks(commands):
            try:
                reply = await self._stub.DispatchBatch(wire.dispatch_batch_to_proto(chunk), timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:  # nothing was taken: one by one
                    self._batches = False
                    out += await _each(self.dispatch, chunk, timeout_s)
                    continue
                error = _dispatch_error(err)
                out += [error] * len(chunk)
                continue
            if len(reply.results) != len(chunk):  # a broken reply: nothing is known of any of them
                out += [DispatchOutcomeUnknown(f"{len(reply.results)} results for {len(chunk)} dispatches")
                        ] * len(chunk)  # fmt: skip
                continue
            out += [wire.dispatch_outcome_from_proto(r) for r in reply.results]
        return out

    async def abort(self, worker_request_id: str) -> None:
        try:
            await self._stub.Abort(wire.abort_to_proto(worker_request_id), timeout=ABORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from err


def _dispatch_error(err: grpc.aio.AioRpcError) -> LayerKVError:
    """A failed Dispatch (or DispatchBatch) call's status as its typed outcome."""
    message = str(error_from_rpc(err))
    code = err.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return DispatchRefused(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return DispatchRejected(message)
    return DispatchOutcomeUnknown(f"{code.name}: {message}")


def chunks(commands: Sequence[DispatchCommand]) -> list[Sequence[DispatchCommand]]:
    """``commands`` cut into runs of at most ``MAX_BATCH_TOKENS`` prompt tokens (at least one
    command each), so that no DispatchBatch message outgrows a worker's receive limit."""
    out: list[Sequence[DispatchCommand]] = []
    start, tokens = 0, 0
    for i, command in enumerate(commands):
        size = len(command.prompt_ids)
        if i > start and tokens + size > MAX_BATCH_TOKENS:
            out.append(commands[start:i])
            start, tokens = i, 0
        tokens += size
    if start < len(commands):
        out.append(commands[start:])
    return out


async def _each(
    dispatch: Callable[[DispatchCommand, float], Awaitable[None]],
    commands: Sequence[DispatchCommand],
    timeout_s: float,
) -> list[LayerKVError | None]:
    """One unary dispatch per command, concurrently: the outcome of each, in order."""

    async def one(command: DispatchCommand) -> LayerKVError | None:
        try:
            await dispatch(command, timeout_s)
        except (DispatchRefused, DispatchRejected, DispatchOutcomeUnknown) as err:
            return err
        return None

    return list(await asyncio.gather(*(one(c) for c in commands)))


class WorkerClient(Protocol):
    """What the scheduler asks of workers."""

    async def dispatch(self, worker_id: str, command: DispatchCommand) -> None: ...

    async def abort(self, worker_id: str, worker_request_id: str) -> None: ...


@runtime_checkable
class BatchWorkerClient(WorkerClient, Protocol):
    """A ``WorkerClient`` that also sends a round's dispatches to one worker in one call."""

    async def dispatch_many(
        self, worker_id: str, commands: Sequence[DispatchCommand]
    ) -> list[LayerKVError | None]:
        """The outcome of each command, in order: None when taken, else the error (a
        ``DispatchRefused``, ``DispatchRejected``, ``DispatchUnsent`` or ``DispatchOutcomeUnknown``)
        that ``dispatch`` would have raised for it."""
        ...


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

    async def dispatch_many(
        self, worker_id: str, commands: Sequence[DispatchCommand]
    ) -> list[LayerKVError | None]:
        handle = self._pool.by_id(worker_id)
        if handle is None or handle.connection is None:
            return [DispatchUnsent(f"worker {worker_id} is gone") for _ in commands]
        return await handle.connection.dispatch_many(commands, self._timeout_s)

    async def abort(self, worker_id: str, worker_request_id: str) -> None:
        handle = self._pool.by_id(worker_id)
        if handle is None or handle.connection is None or not handle.healthy:
            return  # a down worker forgets its requests; a returning one reports them and is told
        await handle.connection.abort(worker_request_id)
