"""The scheduler's calls into workers (Dispatch, Abort), behind a protocol so the core can be tested
without gRPC: ``GrpcWorkerClient`` is the real one, over the pool's connections.

Outcomes are typed: a refused dispatch (no room) and a rejected one (bad request) were certainly
not taken; an unsent one never left; one whose outcome is unknown (a timeout after sending) may be
running on the worker, so the caller must treat its attempt id as spent.
"""

from __future__ import annotations

from typing import Protocol

import grpc
import grpc.aio

from common.errors import LayerKVError
from common.grpc_errors import error_from_rpc
from scheduler_svc import wire
from scheduler_svc.worker_events import DispatchCommand
from scheduler_svc.worker_pool import WorkerPool

DISPATCH_TIMEOUT_S = 30.0
ABORT_TIMEOUT_S = 10.0


class DispatchRefused(LayerKVError):
    """The worker has no room now (it did not take the request)."""


class DispatchRejected(LayerKVError):
    """The worker rejected the request as invalid (it never will take it)."""


class DispatchUnsent(LayerKVError):
    """The dispatch never reached the worker (no connection)."""


class DispatchOutcomeUnknown(LayerKVError):
    """The call failed after it was sent: the worker may have taken the request."""


class WorkerClient(Protocol):
    """What the scheduler asks of workers."""

    async def dispatch(self, worker_id: str, command: DispatchCommand) -> None: ...

    async def abort(self, worker_id: str, worker_request_id: str) -> None: ...


class GrpcWorkerClient:
    """``WorkerClient`` over the gRPC connections of a ``WorkerPool``."""

    def __init__(self, pool: WorkerPool, dispatch_timeout_s: float = DISPATCH_TIMEOUT_S) -> None:
        self._pool = pool
        self._timeout_s = dispatch_timeout_s

    async def dispatch(self, worker_id: str, command: DispatchCommand) -> None:
        handle = self._pool.by_id(worker_id)
        if handle is None or handle.stub is None:
            raise DispatchUnsent(f"worker {worker_id} is gone")
        try:
            await handle.stub.Dispatch(wire.dispatch_to_proto(command), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            message = str(error_from_rpc(err))
            code = err.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise DispatchRefused(message) from err
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise DispatchRejected(message) from err
            raise DispatchOutcomeUnknown(f"{code.name}: {message}") from err

    async def abort(self, worker_id: str, worker_request_id: str) -> None:
        handle = self._pool.by_id(worker_id)
        if handle is None or handle.stub is None or not handle.healthy:
            return  # a down worker forgets its requests; a returning one reports them and is told
        await handle.stub.Abort(wire.abort_to_proto(worker_request_id), timeout=ABORT_TIMEOUT_S)
