"""The WorkerService handlers: the gRPC face of one engine.

Every engine call goes through the ``EngineThread`` (never on the event loop). A dispatch is
validated, then checked and enqueued in one command on the engine thread, so no step can take the
blocks between the check and the enqueue: a dispatch that no longer fits is refused with
RESOURCE_EXHAUSTED ("no room"), never overcommitted. Who may call is checked at the edge, before
any handler (``worker_svc/server.py``: the token and scheduler identity guard every RPC). The
scheduler holds a lease through its StreamEvents subscription: when no subscriber has been
connected for ``lease_s`` (the scheduler died, or declared this worker down and went away), every
running request is aborted, so a worker nobody listens to stops spending blocks on attempts that
have been rerun elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from common.cost_profile import describe_cost
from common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from common.grpc_errors import grpc_errors, status_of
from common.proto.layerkv.v1 import worker_pb2, worker_pb2_grpc
from common.types import Placement, SamplingParams
from common.wire import cost_model_to_proto, dispatch_error_to_proto, geometry_to_proto, profile_info_to_proto
from worker_svc import wire
from worker_svc.engine_thread import EngineThread
from worker_svc.events import EventHub
from worker_svc.metrics import WorkerMetrics
from worker_svc.outputs import KVUsage

log = logging.getLogger(__name__)

# A StreamEvents subscriber gets the current state at least this often while the engine is idle,
# so the scheduler can tell a quiet worker from a dead one.
HEARTBEAT_S = 2.0
# How long the worker keeps running requests with no scheduler subscribed (longer than a scheduler
# restart or reconnect takes: the events meanwhile are buffered for it).
LEASE_S = 30.0

MAX_REQUEST_ID_LEN = 256
# A profile holds the engine thread (dispatches wait) for up to its budget: re-profiles on request
# are at most one per this many seconds, so a looping admin client cannot starve the engine.
PROFILE_MIN_INTERVAL_S = 10.0


@dataclass(frozen=True)
class WorkerIdentity:
    """What Describe reports besides the live cost model (fixed for the worker's lifetime)."""

    worker_id: str
    model: str
    device: str
    dtype: str


@dataclass(frozen=True)
class _Admitted:
    """Result of a successful dispatch command: blocks taken in each tier."""

    gpu_blocks: int
    host_blocks: int
    usage: KVUsage  # after the blocks were taken


def _admit(
    engine: Any, request_id: str, prompt: list[int], sampling: SamplingParams, letters: str,
    preemption: str = "",
) -> _Admitted | None:
    """Runs on the engine thread: validate, check room, enqueue and take the blocks now.

    None means "no room". The blocks are taken in this same command (not at the next step), so
    two dispatches between steps can never both pass the check and overcommit the pool.
    """
    num_layers = engine.geometry.num_layers
    placement = Placement.from_letters(letters, num_layers) if letters else None
    engine.validate(prompt, sampling, placement)
    if not engine.can_admit(len(prompt), sampling.max_tokens, placement):
        return None
    if not engine.admits_immediately():
        return None  # the engine would queue it behind others instead of taking its blocks now
    before = engine.usage()
    engine.add_request(request_id, prompt, sampling, placement, preemption)
    admitted = engine.admit_waiting()  # the step would do it first thing; do it in this command
    assert admitted == [request_id], f"dispatch {request_id!r} passed can_admit but was not admitted"
    after = engine.usage()
    gpu_taken = before.gpu.free_blocks - after.gpu.free_blocks
    return _Admitted(gpu_taken, before.host.free_blocks - after.host.free_blocks, after)


def _dispatch_args(request: worker_pb2.DispatchRequest) -> tuple[str, list[int], SamplingParams, str, str]:
    """A dispatch's checked arguments: id, prompt, sampling, placement letters, preemption mode."""
    rid = request.request_id
    if not rid or len(rid) > MAX_REQUEST_ID_LEN:
        raise InvalidArgument(f"request_id must be 1..{MAX_REQUEST_ID_LEN} characters, got {len(rid)}")
    if not request.prompt_token_ids:
        raise InvalidArgument(f"request {rid!r} has an empty prompt")
    sampling = wire.sampling_from_proto(request.sampling)
    preemption = request.preemption
    if preemption not in ("", "recompute", "swap-layers"):
        raise InvalidArgument(f"preemption {preemption!r} must be recompute, swap-layers or empty")
    return rid, list(request.prompt_token_ids), sampling, request.placement, preemption


def _failed(exc: Exception) -> worker_pb2.DispatchResult:
    """A batch item's error as the status Dispatch would have answered for it alone."""
    if status_of(exc) is grpc.StatusCode.INTERNAL:  # a bug: worth a traceback, as Dispatch logs one
        log.error("unexpected error in DispatchBatch: %r", exc, exc_info=exc)
    return dispatch_error_to_proto(exc)


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Describe, GetTokenizer, Dispatch(Batch), StreamEvents, Abort and Profile over one engine thread."""

    def __init__(
        self,
        identity: WorkerIdentity,
        engine: Any,
        thread: EngineThread,
        hub: EventHub,
        metrics: WorkerMetrics,
        lease_s: float = LEASE_S,
    ) -> None:
        self._identity = identity
        self._engine = engine  # read only for immutable attributes; every call goes through the thread
        self._thread = thread
        self._hub = hub
        self._metrics = metrics
        tok = engine.tokenizer
        kind, payload = tok.to_wire()
        self._tokenizer = worker_pb2.GetTokenizerResponse(
            kind=kind, tokenizer_json=payload, chat_template=tok.chat_template, bos_token=tok.bos_token,
            eos_token=tok.eos_token)
        self._stopping = asyncio.Event()
        self._lease_s = lease_s
        self._lease_timer: asyncio.TimerHandle | None = None
        self._lease_tasks: set[asyncio.Task[None]] = set()
        self.leases_expired = 0
        self._profiling = False
        self._last_profile_s = -PROFILE_MIN_INTERVAL_S  # monotonic end of the last re-profile

    @property
    def hub(self) -> EventHub:
        return self._hub

    def stop_streams(self) -> None:
        """End every StreamEvents call (graceful shutdown)."""
        self._stopping.set()
        self._hub.close()

    @grpc_errors
    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.DescribeResponse:
        # a re-profile replaces it on the engine thread: read it there
        cost, profile = await self._thread.call(lambda e: (e.cost_model, e.cost_profile.info))
        e = self._engine
        return worker_pb2.DescribeResponse(
            worker_id=self._identity.worker_id,
            model=self._identity.model,
            geometry=geometry_to_proto(e.geometry),
            gpu_blocks=e.capacity.gpu_blocks,
            host_blocks=e.capacity.host_blocks,
            cost_model=cost_model_to_proto(cost),
            max_model_len=e.max_model_len,
            eos_token_id=e.eos_token_id if e.eos_token_id is not None else 0,
            device=self._identity.device,
            dtype=self._identity.dtype,
            staging_blocks=e.kv_manager.staging.num_blocks,
            preemption_mode=e.config.preemption_mode,
            max_num_batched_tokens=e.config.max_num_batched_tokens,
            vocab_size=e.model_config.vocab_size,
            profile=profile_info_to_proto(profile),
        )

    @grpc_errors
    async def Profile(
        self, request: worker_pb2.ProfileRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ProfileResponse:
        since = time.monotonic() - self._last_profile_s
        if self._profiling or since < PROFILE_MIN_INTERVAL_S:
            raise FailedPrecondition(
                "a re-profile is running" if self._profiling else
                f"the worker was re-profiled {since:.1f} s ago: at most one re-profile per "
                f"{PROFILE_MIN_INTERVAL_S:.0f} s (each holds dispatches for its duration)")
        self._profiling = True
        try:
            # One command on the engine thread: no dispatch can slip in between the idle check and
            # the measurement (dispatches wait behind it, a second or so), and no step runs meanwhile.
            profile = await self._thread.call(lambda e: e.profile())
        finally:
            self._profiling = False
        self._last_profile_s = time.monotonic()
        log.info("worker %s re-profiled in %.2f s: %s", self._identity.worker_id, profile.info.duration_s,
                 describe_cost(profile.cost_model))
        return worker_pb2.ProfileResponse(cost_model=cost_model_to_proto(profile.cost_model),
                                          profile=profile_info_to_proto(profile.info))

    @grpc_errors
    async def GetTokenizer(
        self, request: worker_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetTokenizerResponse:
        return self._tokenizer

    @grpc_errors
    async def Dispatch(
        self, request: worker_pb2.DispatchRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.DispatchResponse:
        rid, prompt, sampling, letters, preemption = _dispatch_args(request)

        def command(engine: Any) -> _Admitted | None:
            result = _admit(engine, rid, prompt, sampling, letters, preemption)
            if result is not None:
                # The step that would have reported the admission already ran; report it now, on
                # the loop, ordered before any event of the next step (which may carry its tokens).
                self._thread.post(self._publish_admission, [rid], result.usage)
            return result

        admitted = await self._thread.call(command)
        if admitted is None:
            self._metrics.dispatch_refused()
            raise ResourceExhausted(self._no_room(rid, len(prompt)))
        self._metrics.dispatch_accepted()
        return worker_pb2.DispatchResponse(gpu_blocks=admitted.gpu_blocks, host_blocks=admitted.host_blocks)

    def _no_room(self, rid: str, prompt_tokens: int) -> str:
        return (
            f"no room for request {rid!r} on worker {self._identity.worker_id!r}: "
            f"its {prompt_tokens} prompt tokens do not fit the free blocks"
        )

    @grpc_errors
    async def DispatchBatch(
        self, request: worker_pb2.DispatchBatchRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.DispatchBatchResponse:
        """Each request as ``Dispatch`` would take it alone, in order, in one engine command."""
        results = [worker_pb2.DispatchResult() for _ in request.requests]  # each set below
        valid: list[tuple[int, tuple[str, list[int], SamplingParams, str, str]]] = []
        for index, item in enumerate(request.requests):
            try:
                valid.append((index, _dispatch_args(item)))
            except Exception as exc:
                results[index] = _failed(exc)

        def command(engine: Any) -> list[tuple[int, _Admitted | Exception | None]]:
            out: list[tuple[int, _Admitted | Exception | None]] = []
            admitted: list[str] = []
            usage = None
            for index, (rid, prompt, sampling, letters, preemption) in valid:
                try:
                    result = _admit(engine, rid, prompt, sampling, letters, preemption)
                except Exception as exc:  # answered for this request alone, as Dispatch would
                    out.append((index, exc))
                    continue
                if result is not None:
                    admitted.append(rid)
                    usage = result.usage
                out.append((index, result))
            if usage is not None:  # one admission event for the batch, before the next step's
                self._thread.post(self._publish_admission, admitted, usage)
            return out

        for index, outcome in await self._thread.call(command) if valid else []:
            if isinstance(outcome, Exception):
                results[index] = _failed(outcome)
            elif outcome is None:
                self._metrics.dispatch_refused()
                item = request.requests[index]
                results[index] = worker_pb2.DispatchResult(
                    status=worker_pb2.DISPATCH_STATUS_REFUSED,
                    message=self._no_room(item.request_id, len(item.prompt_token_ids)),
                )
            else:
                self._metrics.dispatch_accepted()
                results[index] = worker_pb2.DispatchResult(
                    status=worker_pb2.DISPATCH_STATUS_ACCEPTED,
                    gpu_blocks=outcome.gpu_blocks,
                    host_blocks=outcome.host_blocks,
                )
        return worker_pb2.DispatchBatchResponse(results=results)

    def _publish_admission(self, request_ids: list[str], usage: KVUsage) -> None:
        state = self._hub.state
        self._hub.publish(worker_pb2.StreamEventsResponse(
            running=state.running,
            gpu=wire.tier_usage_to_proto(usage.gpu),
            host=wire.tier_usage_to_proto(usage.host),
            step=worker_pb2.StepReport(kind="idle"),
            admitted_request_ids=request_ids,
        ))

    @grpc_errors
    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        rid = request.request_id
        aborted = await self._thread.call(lambda e: bool(e.abort(rid)))
        return worker_pb2.AbortResponse(aborted=aborted)

    @grpc_errors
    async def StreamEvents(
        self, request: worker_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.StreamEventsResponse]:
        if self._thread.failed is not None:  # a scheduler must see this worker as down, not idle
            raise Unavailable(f"worker {self._identity.worker_id!r} failed: {self._thread.failed}")
        q = self._hub.subscribe()
        if self._lease_timer is not None:  # a scheduler is back: the lease holds
            self._lease_timer.cancel()
            self._lease_timer = None
        try:
            while not self._stopping.is_set():
                # A timer, not wait_for: wait_for wrapped every get in a task of its own, which
                # cost the loop (and so the GIL the engine thread needs) work and an extra loop
                # pass between a step's event and its send, on every step.
                try:
                    if q.empty():
                        async with asyncio.timeout(HEARTBEAT_S):
                            event = await q.get()
                    else:
                        event = q.get_nowait()
                except TimeoutError:
                    event = self._hub.state
                if event is None:  # the server is stopping
                    return
                yield event
        finally:
            self._hub.unsubscribe(q)
            if not self._hub.subscribers:
                self._start_lease()

    def _start_lease(self) -> None:
        if self._lease_s <= 0 or self._stopping.is_set() or self._lease_timer is not None:
            return
        loop = asyncio.get_running_loop()

        def expire() -> None:
            self._lease_timer = None
            task = loop.create_task(self._lease_expired())
            self._lease_tasks.add(task)
            task.add_done_callback(self._lease_tasks.discard)

        self._lease_timer = loop.call_later(self._lease_s, expire)

    async def _lease_expired(self) -> None:
        """No scheduler for a whole lease: abort everything it may have rerun elsewhere."""
        if self._hub.subscribers or self._stopping.is_set():
            return
        ids = [r.request_id for r in self._hub.state.running]
        if not ids:
            return
        self.leases_expired += 1
        try:
            aborted = await self._thread.call(lambda e: [rid for rid in ids if e.abort(rid)])
        except Unavailable as exc:  # the engine stopped: nothing runs any more
            log.warning("lease expired but the engine is gone: %s", exc)
            return
        log.warning("no scheduler subscribed for %.0f s: aborted %d requests", self._lease_s, len(aborted))
