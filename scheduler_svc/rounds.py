"""The scheduling round: snapshot the fleet, ask the policy, re-check, reserve, save, dispatch.

A round builds a read-only ``FleetSnapshot``, asks the active policy for proposals, re-checks each
one (the request still waits, the worker accepts, the ledger has room, no refusal backoff is
pending), reserves, saves and sends the dispatches through the injected ``WorkerClient``: one
call per worker for the whole round when it is a ``BatchWorkerClient`` (the gRPC one: a
``DispatchBatch``), else one call per dispatch, each outcome settled alike. A refusal
releases the reservation and backs the (request, worker) pair off exponentially; a dispatch whose
outcome is unknown spends its attempt id (the request is requeued as a new attempt and the old one
aborted), so a late acceptance can never run under the id of the live attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from common.errors import LayerKVError
from common.types import FinishReason, Tier
from scheduler_svc.inflight import InflightPrefills
from scheduler_svc.ledger import Ledger
from scheduler_svc.lifecycle import Batch, Lifecycle
from scheduler_svc.policies.base import (
    Dispatch,
    FleetSnapshot,
    Policy,
    PreemptionMode,
    PrefillInFlight,
    RunningRequest,
    WaitingRequest,
    WorkerSnapshot,
)
from scheduler_svc.requests import RUNNING, WAITING, RequestState, split_worker_request_id
from scheduler_svc.worker_client import (
    BatchWorkerClient,
    DispatchOutcomeUnknown,
    DispatchRefused,
    DispatchRejected,
    DispatchUnsent,
    WorkerClient,
)
from scheduler_svc.worker_events import DispatchCommand, RunningReport
from scheduler_svc.worker_pool import WorkerHandle, WorkerRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff of refused dispatches, per (request, worker)."""

    first_s: float = 0.05
    max_s: float = 2.0

    def delay(self, refusals: int) -> float:
        return min(self.max_s, self.first_s * 2 ** max(0, refusals - 1))


class Rounds:
    """Scheduling rounds and the dispatches they send."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        ledger: Ledger,
        pool: WorkerRegistry,
        client: WorkerClient,
        policy: Callable[[], Policy],
        running_of: Callable[[str], tuple[RunningReport, ...]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        wake: Callable[[], None],
        backoff: Backoff | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.ledger = ledger
        self.pool = pool
        self.client = client
        # The client again when it sends a worker's dispatches in one call (checked once: a
        # runtime Protocol check costs about 10 us)
        self._batch_client = client if isinstance(client, BatchWorkerClient) else None
        self._policy = policy
        self._running_of = running_of
        self._spawn = spawn
        self._wake = wake
        self.backoff = backoff or Backoff()
        self._refused: dict[tuple[str, str], tuple[int, float]] = {}  # -> (refusals, not before)
        self.rounds = 0
        self.inflight = InflightPrefills()  # dispatched prefills the worker has not reported running
        # worker id -> reserved dispatches waiting for the call in flight to that worker to end
        self._outbox: dict[str, list[tuple[RequestState, str, PreemptionMode]]] = {}
        self._sending: set[str] = set()  # workers with a dispatch call in flight

    # ---- snapshot ----
    def snapshot(self) -> FleetSnapshot:
        lc = self.lifecycle
        waiting = []
        for request_id in lc.queue:
            s = lc.requests[request_id]
            r = s.record
            waiting.append(
                WaitingRequest(
                    request_id,
                    s.context_len,
                    s.remaining_tokens,
                    r.arrival_time,
                    r.ttft_slo_s,
                    r.tpot_slo_s,
                    r.expected_output_tokens or None,
                )
            )
        workers = []
        fitted = self._policy().reads_cost_model
        handles = self.pool.handles()
        if len(self.inflight):
            self.inflight.retain({h.worker_id for h in handles})
        for h in handles:
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
                    cost_model=(
                        h.fitter.model() if fitted and h.fitter is not None else h.description.cost_model
                    ),
                    running=self._running(h),
                    accepting=h.accepting,
                    staging_blocks_total=h.description.staging_blocks,
                    host_used_per_layer=budget.committed_per_layer(Tier.HOST),
                    max_num_batched_tokens=h.description.max_num_batched_tokens,
                    requests_held=budget.num_requests,
                    requests_preempted=budget.num_preempted,
                    prefilling=self.inflight.of(h.worker_id, self._running_of(h.worker_id), self._live),
                )
            )
        return FleetSnapshot(time.time(), tuple(waiting), tuple(workers))

    def _live(self, worker_id: str, worker_rid: str) -> bool:
        """Whether ``worker_rid`` is still its request's live attempt on ``worker_id``."""
        request_id, attempt = split_worker_request_id(worker_rid)
        s = self.lifecycle.requests.get(request_id)
        return (
            s is not None
            and not s.finished
            and s.record.status == RUNNING
            and s.record.worker_id == worker_id
            and attempt == s.record.requeues
        )

    def _running(self, h: WorkerHandle) -> tuple[RunningRequest, ...]:
        out = []
        for r in self._running_of(h.worker_id):
            request_id, attempt = split_worker_request_id(r.worker_request_id)
            s = self.lifecycle.requests.get(request_id)
            if s is None or s.finished or attempt != s.record.requeues:
                continue
            out.append(
                RunningRequest(
                    request_id,
                    len(s.record.prompt_ids),
                    s.sampling.max_tokens,
                    len(s.tokens),
                    r.decode_time_s,
                    s.record.tpot_slo_s,
                    r.placement,
                    s.record.expected_output_tokens or None,
                    s.record.first_token_time,
                )
            )
        return tuple(out)

    # ---- the round ----
    async def schedule_round(self) -> int:
        """One round; returns the number of dispatches sent."""
        self.rounds += 1
        lc = self.lifecycle
        if lc.frozen or not len(lc.queue):
            return 0
        snapshot = self.snapshot()
        if not snapshot.workers:
            return 0
        batch = Batch()
        sends = []
        now = time.time()
        for proposal in self._policy().schedule(snapshot):
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
            lc.queue.remove(record.request_id)
            batch.update(record, "status", "worker_id", "placement", "dispatch_time")
            batch.dequeued.add(record.request_id)
            batch.running.add(record.request_id)
            sends.append((state, state.worker_request_id, proposal.worker_id, proposal.preemption))
            self.inflight.add(proposal.worker_id, state.worker_request_id, _in_flight(state, proposal, now))
        lc.metrics.queue_length.set(len(lc.queue))
        if not sends:
            return 0
        await lc.commit(batch)
        # What was reserved is sent, unless it changed during the commit: its worker went down
        # (requeued as a new attempt, the worker's ledger dropped) or it was cancelled (finished,
        # released). Sending it anyway would dispatch the new attempt nowhere and queue it again
        # while a later round may hold it elsewhere.
        due = []
        for state, rid, worker_id, preemption in sends:
            if _still_due(state, rid, worker_id):
                due.append((state, rid, worker_id, preemption))
            else:
                self.ledger.release(worker_id, rid)  # idempotent: mostly already dropped
        if self._batch_client is not None:  # one call per worker for the whole round
            for state, rid, worker_id, preemption in due:
                self._outbox.setdefault(worker_id, []).append((state, rid, preemption))
            for worker_id in {worker_id for _, _, worker_id, _ in due}:
                if worker_id not in self._sending:  # else it rides the call after the one in flight
                    self._sending.add(worker_id)
                    self._spawn(self._send_dispatches(worker_id))
        else:
            for state, rid, worker_id, preemption in due:
                self._spawn(self._dispatch(state, rid, worker_id, preemption))
        return len(sends)

    def _check(self, proposal: Dispatch) -> RequestState | None:
        """The mechanism's re-check of one proposal; reserves the blocks when it passes."""
        lc = self.lifecycle
        state = lc.requests.get(proposal.request_id)
        if state is None or state.record.status != WAITING or proposal.request_id not in lc.queue:
            return None
        handle = self.pool.by_id(proposal.worker_id)
        if handle is None or not handle.accepting or handle.description is None:
            return None
        refused = self._refused.get((proposal.request_id, proposal.worker_id))
        if refused is not None and time.monotonic() < refused[1]:
            return None  # refused there a moment ago: wait out its backoff
        total = state.context_len + state.remaining_tokens
        if total > handle.description.max_model_len:
            return None
        reservation = self.ledger.try_reserve(
            proposal.worker_id,
            state.worker_request_id,
            state.context_len,
            proposal.placement,
            max_tokens=state.remaining_tokens,
            headroom_tokens=proposal.headroom_tokens,
        )
        return state if reservation is not None else None

    @staticmethod
    def _command(state: RequestState, worker_rid: str, preemption: PreemptionMode) -> DispatchCommand:
        return DispatchCommand(
            worker_rid,
            tuple(state.context_ids),
            state.sampling,
            state.remaining_tokens,
            state.record.placement,
            preemption,
        )

    async def _dispatch(
        self,
        state: RequestState,
        worker_rid: str,
        worker_id: str,
        preemption: PreemptionMode = PreemptionMode.WORKER_DEFAULT,
    ) -> None:
        error: LayerKVError | None = None
        try:
            await self.client.dispatch(worker_id, self._command(state, worker_rid, preemption))
        except (DispatchRefused, DispatchRejected, DispatchUnsent, DispatchOutcomeUnknown) as err:
            error = err
        await self._settle(worker_id, [(state, worker_rid, error)])

    async def _send_dispatches(self, worker_id: str) -> None:
        """Group dispatch, as the commits are grouped: one ``DispatchBatch`` in flight per worker,
        and every round's dispatches to it that came meanwhile go together in the next call. A
        lone request goes at once; under load a call carries several rounds' requests (a call and
        a worker event per round otherwise: most of the scheduler's per-request cost). What
        changed while it waited (cancelled, requeued after its worker went down) is not sent."""
        try:
            while items := self._outbox.pop(worker_id, None):
                due = []
                for state, rid, preemption in items:
                    if _still_due(state, rid, worker_id):
                        due.append((state, rid, preemption))
                    else:
                        self.ledger.release(worker_id, rid)  # idempotent: mostly already dropped
                if due:
                    await self._dispatch_many(worker_id, due)
        finally:
            self._sending.discard(worker_id)

    async def _dispatch_many(
        self, worker_id: str, items: list[tuple[RequestState, str, PreemptionMode]]
    ) -> None:
        """A round's dispatches to one worker, in one call; each settled as ``_dispatch`` would."""
        assert self._batch_client is not None
        commands = [self._command(state, rid, preemption) for state, rid, preemption in items]
        outcomes = await self._batch_client.dispatch_many(worker_id, commands)
        await self._settle(worker_id, [(s, rid, e) for (s, rid, _), e in zip(items, outcomes, strict=True)])

    async def _settle(
        self, worker_id: str, outcomes: list[tuple[RequestState, str, LayerKVError | None]]
    ) -> None:
        """What the worker's answers mean: a refused dispatch waits again (with backoff), a rejected
        one ends, an unsent one waits again, one whose outcome is unknown is requeued as a new
        attempt (the old one aborted); the failures are saved in one commit."""
        lc = self.lifecycle
        batch = Batch()
        failed = False
        for state, worker_rid, err in outcomes:
            if err is None:
                continue
            self.ledger.release(worker_id, worker_rid)
            if isinstance(err, DispatchOutcomeUnknown):  # it may run there: never reuse the id
                self._spawn(self.abort(worker_id, worker_rid))
            if state.finished or state.worker_request_id != worker_rid:
                continue
            failed = True
            if isinstance(err, DispatchRefused):
                lc.metrics.series(lc.metrics.dispatches_refused, worker_id).inc()
                self._refuse(state.request_id, worker_id)
                lc.back_to_queue(state, batch)
            elif isinstance(err, DispatchRejected):
                lc.finish(state, FinishReason.ERROR, batch, str(err))
            elif isinstance(err, DispatchOutcomeUnknown):
                log.warning(
                    "dispatch of %s to %s failed after sending (%s); requeued as a new attempt",
                    worker_rid,
                    worker_id,
                    err,
                )
                lc.requeue(state, batch)
            else:
                log.warning("dispatch of %s to %s failed: %s", worker_rid, worker_id, err)
                lc.back_to_queue(state, batch)
        if failed:
            await lc.commit(batch)
            self._wake()
        accepted = [(state, worker_rid) for state, worker_rid, err in outcomes if err is None]
        if accepted:
            counter = lc.metrics.series(lc.metrics.dispatches, worker_id)
        for state, worker_rid in accepted:
            self._refused.pop((state.request_id, worker_id), None)
            counter.inc()
            if state.record.requeues == 0:  # queueing ends when a worker takes the request
                lc.metrics.queue_time.observe(state.record.dispatch_time - state.record.arrival_time)
            # Cancelled while the dispatch was in flight: the cancel's abort may have reached the
            # worker before the dispatch did, so abort again. Not when the worker itself reported
            # the attempt's end (a short request under load finishes before its dispatch call
            # returns): that was one needless Abort RPC per such request. In the background, so the
            # worker's next dispatch call does not wait on it.
            if state.finished and not state.ended_on_worker:
                self._spawn(self.abort(worker_id, worker_rid))

    def _refuse(self, request_id: str, worker_id: str) -> None:
        count = self._refused.get((request_id, worker_id), (0, 0.0))[0] + 1
        delay = self.backoff.delay(count)
        self._refused[(request_id, worker_id)] = (count, time.monotonic() + delay)
        asyncio.get_running_loop().call_later(delay, self._wake)
        if len(self._refused) > 100_000:  # bounded: forget the oldest backoffs
            for key in list(self._refused)[:50_000]:
                del self._refused[key]

    async def abort(self, worker_id: str, worker_rid: str) -> None:
        try:
            await self.client.abort(worker_id, worker_rid)
        except Exception as exc:  # the worker reports it again if it still runs it
            log.warning("abort of %s on %s failed: %s", worker_rid, worker_id, exc)


def _still_due(state: RequestState, worker_rid: str, worker_id: str) -> bool:
    """Whether a reserved dispatch is still to be sent: the same attempt, to the same worker, live."""
    record = state.record
    return state.worker_request_id == worker_rid and record.worker_id == worker_id and not state.finished


def _in_flight(state: RequestState, proposal: Dispatch, now: float) -> PrefillInFlight:
    r = state.record
    return PrefillInFlight(
        r.request_id,
        len(r.prompt_ids) + len(state.tokens),
        state.remaining_tokens,
        proposal.placement,
        r.tpot_slo_s,
        now,
        r.expected_output_tokens or None,
    )
