"""The scheduler's mechanism: requests, the waiting queue, the ledger, rounds and worker events.

A scheduling round builds a read-only ``FleetSnapshot``, asks the active policy for proposals,
re-checks each one (the request still waits, the worker accepts, the ledger has room), reserves,
persists and sends ``WorkerService.Dispatch``; a refusal releases the reservation and requeues.
Worker events append tokens (one Redis pipeline per event), confirm reservations and finish
requests. A worker that goes down has its requests requeued to regenerate from prompt + tokens
already streamed. The mechanism never looks at the policy's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

import grpc
import grpc.aio

from common.config import SchedulerSettings
from common.errors import InvalidArgument, NotFound
from common.grpc_errors import error_from_rpc
from common.metrics import ServiceMetrics
from common.proto.layerkv.v1 import types_pb2, worker_pb2
from common.store import RequestRecord, Store, StoreBatch, batch_tokens
from common.types import FinishReason, Placement, SamplingParams, Tier
from common.wire import sampling_to_proto
from scheduler_svc.cost_fit import StepTiming
from scheduler_svc.ledger import Ledger, TierReport
from scheduler_svc.policies.base import (
    Dispatch,
    FleetSnapshot,
    Policy,
    RunningRequest,
    WaitingRequest,
    WorkerSnapshot,
)
from scheduler_svc.policies.registry import make_policy, policy_params
from scheduler_svc.requests import RUNNING, WAITING, RequestState, sampling_from_dict, split_worker_request_id
from scheduler_svc.waiting_queue import WaitingQueue
from scheduler_svc.wire import worker_report_from_proto
from scheduler_svc.worker_pool import ChannelSecurity, WorkerHandle, WorkerPool

log = logging.getLogger(__name__)

FINISH_OF_PROTO = {
    types_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    types_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    types_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
    types_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
}
FINISHED_KEPT_IN_MEMORY = 10_000  # older finished requests are served from Redis


class SchedulerCore:
    """State and mechanism of one scheduler; the gRPC servicers are thin wrappers around it."""

    def __init__(self, settings: SchedulerSettings, store: Store, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.queue = WaitingQueue(settings.queue_limit)
        self.ledger = Ledger()
        self.requests: dict[str, RequestState] = {}
        self._finished_order: OrderedDict[str, None] = OrderedDict()
        self._orphans: dict[str, set[str]] = {}  # worker id -> worker-side ids to abort on connect
        self.pool = WorkerPool(
            self,
            ChannelSecurity(
                settings.tls_ca,
                settings.tls_cert if settings.tls_ca else "",
                settings.tls_key if settings.tls_ca else "",
                settings.worker_server_name,
                settings.worker_token,
            ),
            retry_s=settings.worker_retry_s,
            registered_ttl_s=settings.registered_worker_ttl_s,
        )
        self.policy: Policy = make_policy(settings.policy, settings.policy_params)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._dispatches: set[asyncio.Task[None]] = set()
        self.rounds = 0
        self.stopped = False

    # ---- lifecycle ----
    async def start(self) -> None:
        await self.store.ping()
        stored = await self.store.get_policy()
        if stored is not None:
            try:
                self.policy = make_policy(stored.name, stored.params)
            except Exception as exc:  # a stored policy this build no longer knows: keep the flag's
                log.warning("stored policy %r rejected (%s); using %r", stored.name, exc, self.policy.name)
        await self.store.set_policy(self.policy.name, policy_params(self.policy))
        await self._recover()
        for address in self.settings.workers:
            self.pool.add(address)
        for entry in await self.store.workers():
            if entry.registered:
                self.pool.add(entry.address, registered=True)
        if self.settings.workers_dns:
            self.pool.start_dns(self.settings.workers_dns, self.settings.workers_dns_interval_s)
        self._loop_task = asyncio.create_task(self._schedule_loop(), name="scheduling-loop")

    async def stop(self) -> None:
        # Frozen from here on: whatever a cancelled task still delivers changes nothing, so Redis
        # holds exactly what the next scheduler recovers.
        self.stopped = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._wake.set()
            await asyncio.wait({self._loop_task}, timeout=2.0)
        for task in list(self._dispatches):
            task.cancel()
        await self.pool.close()

    async def _recover(self) -> None:
        """Reload waiting and running requests. Running ones restart from their token log: tokens
        their worker produced while no scheduler listened may be lost, so the old attempt is
        aborted on its worker once it connects and the request is requeued."""
        batch = StoreBatch()
        records = await self.store.active_requests()
        for record in records:
            state = RequestState(record, _sampling(record), await self.store.get_tokens(record.request_id))
            self.requests[record.request_id] = state
            if record.status == RUNNING:
                self._orphans.setdefault(record.worker_id, set()).add(state.worker_request_id)
                self._requeue(state, batch)
            elif state.remaining_tokens <= 0:
                self._finish(state, FinishReason.LENGTH, batch)
            else:
                self.queue.push(record.request_id, record.arrival_time, requeue=True)
        await self.store.commit(batch)
        if records:
            log.info("recovered %d requests from Redis (%d waiting)", len(records), len(self.queue))

    # ---- requests ----
    def wake(self) -> None:
        self._wake.set()

    async def cancel(self, request_id: str) -> bool:
        state = self.requests.get(request_id)
        if state is None:
            record = await self.store.get_request(request_id)
            if record is None:
                raise NotFound(f"unknown request id {request_id!r}")
            return False  # an old request: finished long ago
        if state.finished:
            return False
        state.cancelled = True
        batch = StoreBatch()
        worker_id, worker_rid = state.record.worker_id, state.worker_request_id
        was_running = state.record.status == RUNNING
        self._finish(state, FinishReason.ABORT, batch)
        await self.store.commit(batch)
        if was_running:
            await self._abort_on_worker(worker_id, worker_rid)
        return True

    def _finish(self, state: RequestState, reason: FinishReason, batch: StoreBatch, error: str = "") -> None:
        self.queue.remove(state.request_id)
        if state.record.worker_id:
            self.ledger.release(state.record.worker_id, state.worker_request_id)
        state.finish(reason, error)
        record = state.record
        batch.update(record, "status", "finish_reason", "error", "finish_time", "output_tokens")
        batch.finished.add(record.request_id)
        self.metrics.requests.labels(reason.value).inc()
        self.metrics.e2e.observe(record.finish_time - record.arrival_time)
        if len(state.tokens) > 1 and record.first_token_time:
            self.metrics.tpot.observe(
                (record.finish_time - record.first_token_time) / (len(state.tokens) - 1)
            )
        self.metrics.queue_length.set(len(self.queue))
        self._finished_order[record.request_id] = None
        while len(self._finished_order) > FINISHED_KEPT_IN_MEMORY:
            old, _ = self._finished_order.popitem(last=False)
            self.requests.pop(old, None)

    def _requeue(self, state: RequestState, batch: StoreBatch) -> None:
        """Back to the queue (a worker failed it): the next attempt regenerates from its log."""
        record = state.record
        record.requeues += 1
        record.status, record.worker_id, record.placement = WAITING, "", ""
        batch.update(record, "requeues", "status", "worker_id", "placement")
        batch.running.discard(record.request_id)
        self.metrics.requeues.inc()
        if state.remaining_tokens <= 0:
            self._finish(state, FinishReason.LENGTH, batch)
            return
        self.queue.push(record.request_id, record.arrival_time, requeue=True)
        batch.enqueued[record.request_id] = record.arrival_time
        self.metrics.queue_length.set(len(self.queue))

    # ---- policies ----
    async def set_policy(self, name: str, params: dict[str, object]) -> tuple[Policy, Policy]:
        """Validate, persist and swap (takes effect at the next round); returns (previous, current)."""
        policy = make_policy(name, params)
        await self.store.set_policy(policy.name, policy_params(policy))
        previous, self.policy = self.policy, policy
        log.info("policy %s -> %s %s", previous.name, policy.name, policy_params(policy))
        self.wake()
        return previous, policy

    # ---- rounds ----
    async def _schedule_loop(self) -> None:
        # Checks ``stopped`` too: Python 3.11's wait_for can swallow a cancellation that lands as its
        # timeout fires, and a loop that only relied on cancel() would then run (and hang stop()) forever.
        while not self.stopped:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            try:
                await self.schedule_round()
            except Exception:  # keep scheduling; the failure is logged with its traceback
                log.exception("scheduling round failed")
                await asyncio.sleep(self.settings.round_interval_s)

    def snapshot(self) -> FleetSnapshot:
        waiting = []
        for request_id in self.queue:
            s = self.requests[request_id]
            waiting.append(
                WaitingRequest(
                    request_id,
                    len(s.context_ids),
                    s.remaining_tokens,
                    s.record.arrival_time,
                    s.record.ttft_slo_s,
                    s.record.tpot_slo_s,
                )
            )
        workers = []
        for h in self.pool.handles():
            budget = self.ledger.get(h.worker_id) if h.healthy else None
            if budget is None or h.description is None:
                continue
            workers.append(
                WorkerSnapshot(
                    worker_id=h.worker_id,
                    geometry=budget.geometry,
                    gpu_blocks_total=budget.capacity.gpu_blocks,
                    host_blocks_total=budget.capacity.host_blocks,
                    gpu_blocks_free=budget.gpu_free,
                    host_blocks_free=budget.host_free,
                    max_model_len=h.description.max_model_len,
                    cost_model=h.fitter.model() if h.fitter is not None else h.description.cost_model,
                    running=self._running_of(h),
                    accepting=h.accepting,
                    staging_blocks_total=h.description.staging_blocks,
                    host_used_per_layer=budget.committed_per_layer(Tier.HOST),
                    max_num_batched_tokens=h.description.max_num_batched_tokens,
                    requests_held=budget.num_requests,
                    requests_preempted=budget.num_preempted,
                )
            )
        return FleetSnapshot(time.time(), tuple(waiting), tuple(workers))

    def _running_of(self, h: WorkerHandle) -> tuple[RunningRequest, ...]:
        out = []
        num_layers = h.description.geometry.num_layers if h.description else 0
        for r in h.last_running:
            request_id, attempt = split_worker_request_id(r.request_id)
            s = self.requests.get(request_id)
            if s is None or s.finished or attempt != s.record.requeues:
                continue
            try:
                placement = Placement.from_letters(r.placement, num_layers)
            except InvalidArgument:  # a worker that reports no placement: count it as all-GPU
                placement = Placement.all_gpu(num_layers)
            out.append(
                RunningRequest(
                    request_id,
                    len(s.record.prompt_ids),
                    s.sampling.max_tokens,
                    len(s.tokens),
                    r.decode_time_s,
                    s.record.tpot_slo_s,
                    placement,
                )
            )
        return tuple(out)

    async def schedule_round(self) -> int:
        """One round; returns the number of dispatches sent."""
        self.rounds += 1
        if self.stopped or not len(self.queue):
            return 0
        snapshot = self.snapshot()
        if not snapshot.workers:
            return 0
        batch = StoreBatch()
        sends = []
        now = time.time()
        for proposal in self.policy.schedule(snapshot):
            state = self._check(proposal)
            if state is None:
                continue
            record = state.record
            record.status, record.worker_id, record.placement = (
                RUNNING,
                proposal.worker_id,
                proposal.placement.letters,
            )
            record.dispatch_time = record.dispatch_time or now
            self.queue.remove(record.request_id)
            batch.update(record, "status", "worker_id", "placement", "dispatch_time")
            batch.dequeued.add(record.request_id)
            batch.running.add(record.request_id)
            sends.append((state, proposal))
        self.metrics.queue_length.set(len(self.queue))
        if not sends:
            return 0
        await self.store.commit(batch)
        for state, proposal in sends:
            self._spawn(
                self._dispatch(
                    state, state.worker_request_id, state.record.worker_id, proposal.preemption.value
                )
            )
        return len(sends)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a worker RPC in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self._dispatches.add(task)
        task.add_done_callback(self._dispatches.discard)

    def _check(self, proposal: Dispatch) -> RequestState | None:
        """The mechanism's re-check of one proposal; reserves the blocks when it passes."""
        state = self.requests.get(proposal.request_id)
        if state is None or state.record.status != WAITING or proposal.request_id not in self.queue:
            return None
        handle = self.pool.by_id(proposal.worker_id)
        if handle is None or not handle.accepting or handle.description is None:
            return None
        total = len(state.context_ids) + state.remaining_tokens
        if total > handle.description.max_model_len:
            return None
        reservation = self.ledger.try_reserve(
            proposal.worker_id,
            state.worker_request_id,
            len(state.context_ids),
            proposal.placement,
            max_tokens=state.remaining_tokens,
            headroom_tokens=proposal.headroom_tokens,
        )
        return state if reservation is not None else None

    async def _dispatch(
        self, state: RequestState, worker_rid: str, worker_id: str, preemption: str = ""
    ) -> None:
        handle = self.pool.by_id(worker_id)
        sampling = sampling_to_proto(state.sampling, max_tokens=state.remaining_tokens)
        request = worker_pb2.DispatchRequest(
            request_id=worker_rid,
            prompt_token_ids=state.context_ids,
            sampling=sampling,
            placement=state.record.placement,
            preemption=preemption,
        )
        try:
            if handle is None or handle.stub is None:
                raise ConnectionError(f"worker {worker_id} is gone")
            await handle.stub.Dispatch(request, timeout=30)
            self.metrics.dispatches.labels(worker_id).inc()
            if state.record.requeues == 0:  # queueing ends when a worker takes the request
                self.metrics.queue_time.observe(state.record.dispatch_time - state.record.arrival_time)
        except (grpc.aio.AioRpcError, ConnectionError) as err:
            self.ledger.release(worker_id, worker_rid)
            if state.finished or state.worker_request_id != worker_rid:
                return
            batch = StoreBatch()
            code = err.code() if isinstance(err, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.metrics.dispatches_refused.labels(worker_id).inc()
                self._back_to_queue(state, batch)
            elif code == grpc.StatusCode.INVALID_ARGUMENT:
                self._finish(state, FinishReason.ERROR, batch, error_from_rpc(err).args[0])  # type: ignore[arg-type]
            else:
                log.warning("dispatch of %s to %s failed: %s", worker_rid, worker_id, err)
                self._back_to_queue(state, batch)
            await self.store.commit(batch)
            self.wake()
            return
        if state.finished:  # cancelled while the dispatch was in flight
            await self._abort_on_worker(worker_id, worker_rid)

    def _back_to_queue(self, state: RequestState, batch: StoreBatch) -> None:
        """A refused dispatch: the same attempt waits again (the worker never took it)."""
        record = state.record
        record.status, record.worker_id, record.placement = WAITING, "", ""
        if record.requeues == 0:  # no worker ever took it: it is still queueing
            record.dispatch_time = 0.0
        batch.update(record, "status", "worker_id", "placement", "dispatch_time")
        batch.running.discard(record.request_id)
        self.queue.push(record.request_id, record.arrival_time, requeue=True)
        batch.enqueued[record.request_id] = record.arrival_time

    async def _abort_on_worker(self, worker_id: str, worker_rid: str) -> None:
        handle = self.pool.by_id(worker_id)
        if handle is None or handle.stub is None or not handle.healthy:
            return  # a down worker forgets its requests; a returning one gets an orphan abort
        try:
            await handle.stub.Abort(worker_pb2.AbortRequest(request_id=worker_rid), timeout=10)
        except grpc.aio.AioRpcError as err:
            log.warning("abort of %s on %s failed: %s", worker_rid, worker_id, error_from_rpc(err))

    # ---- WorkerListener ----
    async def worker_up(self, worker: WorkerHandle) -> None:
        d = worker.description
        assert d is not None, "a worker is up only after Describe"
        self.ledger.add_worker(d.worker_id, d.geometry, d.capacity, d.staging_blocks)
        log.info(
            "worker %s up at %s (%s, %d GPU + %d host blocks)",
            d.worker_id,
            worker.address,
            d.model,
            d.capacity.gpu_blocks,
            d.capacity.host_blocks,
        )
        for worker_rid in sorted(self._orphans.pop(d.worker_id, set())):
            self._spawn(self._abort_on_worker(d.worker_id, worker_rid))
        self.wake()

    async def worker_down(self, worker: WorkerHandle) -> None:
        if self.stopped:
            return
        worker_id = worker.worker_id
        log.warning("worker %s at %s is down; requeueing its requests", worker_id, worker.address)
        self.ledger.remove_worker(worker_id)
        batch = StoreBatch()
        for state in list(self.requests.values()):
            if state.record.status == RUNNING and state.record.worker_id == worker_id:
                self._requeue(state, batch)
        await self.store.commit(batch)
        self.wake()

    async def worker_event(self, worker: WorkerHandle, event: worker_pb2.StreamEventsResponse) -> None:
        if self.stopped:
            return
        worker_id = worker.worker_id
        worker.last_running = tuple(event.running)
        report = worker_report_from_proto(event)
        self.ledger.apply_report(worker_id, report)
        self._observe_step(worker, event, report.gpu, report.host)
        batch = StoreBatch()
        now = time.time()
        for update in event.tokens:
            request_id, attempt = split_worker_request_id(update.request_id)
            state = self.requests.get(request_id)
            if (
                state is None
                or state.finished
                or state.record.worker_id != worker_id
                or attempt != state.record.requeues
            ):
                continue  # stale: an older attempt, another worker, or already finished
            if update.token_ids:
                new = list(update.token_ids)[: max(state.remaining_tokens, 0)]
                if new and not state.tokens:
                    state.record.first_token_time = now
                    batch.update(state.record, "first_token_time")
                    self.metrics.ttft.observe(now - state.record.arrival_time)
                state.tokens.extend(new)
                batch_tokens(batch, request_id, new)
                self.metrics.observe_tokens(request_id, len(new), len(state.record.prompt_ids), now)
                state.notify()
            if update.finished:
                reason = FINISH_OF_PROTO.get(update.finish_reason, FinishReason.ERROR)
                self._finish(state, reason, batch, update.error)
        await self.store.commit(batch)
        if len(self.queue):  # the report may have freed blocks for a waiting request
            self.wake()

    def _observe_step(
        self,
        worker: WorkerHandle,
        event: worker_pb2.StreamEventsResponse,
        gpu: TierReport | None,
        host: TierReport | None,
    ) -> None:
        worker_id = worker.worker_id
        if gpu is not None:
            self.metrics.observe_usage(worker_id, "gpu", gpu.used_per_layer, gpu.free_blocks)
        if host is not None:
            self.metrics.observe_usage(worker_id, "host", host.used_per_layer, host.free_blocks)
        self.metrics.running.labels(worker_id).set(len(event.running))
        if not event.HasField("step"):
            return
        step = event.step
        self.metrics.bytes_offloaded.labels(worker_id).inc(step.bytes_offloaded)
        self.metrics.bytes_loaded.labels(worker_id).inc(step.bytes_loaded)
        self.metrics.preempted(worker_id, step.num_preemptions)
        if worker.fitter is not None and step.kind in ("prefill", "decode", "mixed"):
            worker.fitter.observe(
                StepTiming(
                    step.kind,
                    step.duration_s,
                    step.num_tokens,
                    sum(r.context_tokens for r in event.running),
                    step.bytes_offloaded,
                    step.bytes_loaded,
                    step.copy_wait_s,
                    step.num_prefill_tokens,
                    step.num_decode_requests,
                )
            )


def _sampling(record: RequestRecord) -> SamplingParams:
    return sampling_from_dict(record.sampling)
