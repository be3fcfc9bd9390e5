"""Worker-event intake: what a worker's connection coming up, its typed events and its loss do.

Events append tokens (one saved batch per event, then published to streams), confirm reservations
and finish requests. Any attempt a worker reports running that is not the live attempt of a live
request on that worker (an attempt abandoned while the worker was hung or partitioned, or left by
a previous scheduler) is aborted there, once, so its blocks come back. A worker that goes down has
its requests requeued to regenerate from prompt + saved tokens. Nothing here raises on a store
outage: the store retries until Redis is back, so a Redis blip never marks a worker down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from common.metrics import ServiceMetrics
from scheduler_svc.cost_fit import StepTiming
from scheduler_svc.ledger import Ledger
from scheduler_svc.lifecycle import Batch, Lifecycle
from scheduler_svc.requests import RUNNING, split_worker_request_id
from scheduler_svc.worker_events import RunningReport, StepKind, WorkerEvent
from scheduler_svc.worker_pool import WorkerHandle

log = logging.getLogger(__name__)

_FITTED_KINDS = {StepKind.PREFILL: "prefill", StepKind.DECODE: "decode", StepKind.MIXED: "mixed"}


class EventIntake:
    """Applies worker lifecycle and events to the requests and the ledger."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        ledger: Ledger,
        metrics: ServiceMetrics,
        abort: Callable[[str, str], Coroutine[Any, Any, None]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        wake: Callable[[], None],
    ) -> None:
        self.lifecycle = lifecycle
        self.ledger = ledger
        self.metrics = metrics
        self._abort = abort
        self._spawn = spawn
        self._wake = wake
        self.running: dict[str, tuple[RunningReport, ...]] = {}  # worker id -> latest running list
        self._aborting: dict[str, set[str]] = {}  # worker id -> abandoned attempts already aborted

    def running_of(self, worker_id: str) -> tuple[RunningReport, ...]:
        return self.running.get(worker_id, ())

    async def worker_up(self, worker: WorkerHandle) -> None:
        d = worker.description
        assert d is not None, "a worker is up only after Describe"
        self.ledger.add_worker(d.worker_id, d.geometry, d.capacity, d.staging_blocks)
        self._aborting[d.worker_id] = set()
        log.info(
            "worker %s up at %s (%s, %d GPU + %d host blocks)",
            d.worker_id,
            worker.address,
            d.model,
            d.capacity.gpu_blocks,
            d.capacity.host_blocks,
        )
        self._wake()

    async def worker_down(self, worker: WorkerHandle) -> None:
        lc = self.lifecycle
        if lc.frozen:
            return
        worker_id = worker.worker_id
        log.warning("worker %s at %s is down; requeueing its requests", worker_id, worker.address)
        self.ledger.remove_worker(worker_id)
        self.running.pop(worker_id, None)
        batch = Batch()
        for state in list(lc.requests.values()):
            if state.record.status == RUNNING and state.record.worker_id == worker_id:
                lc.requeue(state, batch)
        await lc.commit(batch)
        self._wake()

    async def worker_event(self, worker: WorkerHandle, event: WorkerEvent) -> None:
        lc = self.lifecycle
        if lc.frozen:
            return
        worker_id = worker.worker_id
        self.running[worker_id] = event.running
        self.ledger.apply_report(worker_id, event)
        self._observe_step(worker, event)
        self._abort_abandoned(worker_id, event)
        batch = Batch()
        now = time.time()
        for update in event.tokens:
            request_id, attempt = split_worker_request_id(update.worker_request_id)
            state = lc.requests.get(request_id)
            if (
                state is None
                or state.finished
                or state.record.worker_id != worker_id
                or attempt != state.record.requeues
            ):
                continue  # stale: an older attempt, another worker, or already finished
            new = list(update.token_ids)[: max(state.remaining_tokens, 0)]
            if new:
                if not state.tokens:
                    state.record.first_token_time = now
                    batch.update(state.record, "first_token_time")
                    self.metrics.ttft.observe(now - state.record.arrival_time)
                batch.tokens_of(state, new)
                self.metrics.observe_tokens(request_id, len(new), len(state.record.prompt_ids), now)
            if update.finished and update.finish_reason is not None:
                state.ended_on_worker = True
                lc.finish(state, update.finish_reason, batch, update.error)
        await lc.commit(batch)
        if len(lc.queue):  # the report may have freed blocks for a waiting request
            self._wake()

    def _abort_abandoned(self, worker_id: str, event: WorkerEvent) -> None:
        """Abort, once each, attempts the worker runs that are not ours any more."""
        aborting = self._aborting.setdefault(worker_id, set())
        reported = {r.worker_request_id for r in event.running}
        aborting &= reported  # forget the ones that ended
        for worker_rid in sorted(reported - aborting):
            request_id, attempt = split_worker_request_id(worker_rid)
            state = self.lifecycle.requests.get(request_id)
            live = (
                state is not None
                and not state.finished
                and state.record.status == RUNNING
                and state.record.worker_id == worker_id
                and attempt == state.record.requeues
            )
            if not live:
                aborting.add(worker_rid)
                log.info("worker %s runs abandoned attempt %s: aborting it", worker_id, worker_rid)
                self._spawn(self._abort(worker_id, worker_rid))

    def _observe_step(self, worker: WorkerHandle, event: WorkerEvent) -> None:
        worker_id = worker.worker_id
        if event.gpu is not None:
            self.metrics.observe_usage(worker_id, "gpu", event.gpu.used_per_layer, event.gpu.free_blocks)
        if event.host is not None:
            self.metrics.observe_usage(worker_id, "host", event.host.used_per_layer, event.host.free_blocks)
        self.metrics.series(self.metrics.running, worker_id).set(len(event.running))
        step = event.step
        if step is None:
            return
        if step.bytes_offloaded:  # most steps move nothing: skip the series lookups
            self.metrics.series(self.metrics.bytes_offloaded, worker_id).inc(step.bytes_offloaded)
        if step.bytes_loaded:
            self.metrics.series(self.metrics.bytes_loaded, worker_id).inc(step.bytes_loaded)
        self.metrics.preempted(worker_id, step.num_preemptions)
        kind = _FITTED_KINDS.get(step.kind)
        if worker.fitter is not None and kind is not None:
            worker.fitter.observe(
                StepTiming(
                    kind,
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
