"""The request lifecycle: admit, cancel, finish, requeue, recover, and the saving of each change.

Every state change goes into a ``Batch`` and reaches client streams only after that batch is saved
(``commit`` publishes it): a token a client saw is always in the token log, so a restarted
scheduler continues exactly the output the client has. Batches are saved by group commit: one
pipeline in flight, carrying every batch that arrived while the previous one was out, in order.
Commits run shielded: an RPC cancelled mid-commit cannot leave memory and Redis disagreeing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from common.errors import NotFound, Unavailable
from common.metrics import ServiceMetrics
from common.store import RequestRecord, Store, StoreBatch, batch_tokens
from common.types import FinishReason, SamplingParams
from scheduler_svc.ledger import Ledger
from scheduler_svc.requests import RUNNING, WAITING, RequestState, sampling_from_dict
from scheduler_svc.waiting_queue import WaitingQueue

log = logging.getLogger(__name__)

FINISHED_KEPT_IN_MEMORY = 10_000  # older finished requests are served from Redis


@dataclass
class Batch(StoreBatch):
    """A ``StoreBatch`` that also knows which streams may send what once it is saved."""

    # request id -> (state, token-log length saved by this batch or None, finish saved by it)
    touched: dict[str, tuple[RequestState, int | None, bool]] = field(default_factory=dict)

    def tokens_of(self, state: RequestState, new: list[int]) -> None:
        """Append ``new`` to ``state``'s log (idempotently: at the offset they start at)."""
        batch_tokens(self, state.request_id, new, offset=len(state.tokens))
        state.tokens.extend(new)
        _, _, finish = self.touched.get(state.request_id, (state, None, False))
        self.touched[state.request_id] = (state, len(state.tokens), finish)

    def finished_of(self, state: RequestState) -> None:
        _, upto, _ = self.touched.get(state.request_id, (state, None, False))
        self.touched[state.request_id] = (state, upto, True)


class Lifecycle:
    """The requests of one scheduler, in memory (authoritative while it runs) and in Redis."""

    def __init__(
        self,
        store: Store,
        ledger: Ledger,
        metrics: ServiceMetrics,
        queue_limit: int,
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.metrics = metrics
        self.queue = WaitingQueue(queue_limit)
        self.requests: dict[str, RequestState] = {}
        self._finished_order: OrderedDict[str, None] = OrderedDict()
        self._cancel_pending: set[str] = set()  # cancelled while stored but not yet in memory
        self._wake = wake
        self._pending: list[tuple[Batch, asyncio.Future[None] | None]] = []  # batches to save next
        self._flusher: asyncio.Task[None] | None = None  # saving a group of batches now
        # Admitted with an id the scheduler chose, not saved yet: the records ride in front of the
        # next commit (under load, and for a lone request the round's dispatch commit).
        self._unsaved = Batch()
        self.frozen = False  # the scheduler stops: change nothing any more

    async def commit(self, batch: Batch) -> None:
        """Save ``batch`` (retrying while Redis is away), then let the streams send what it holds."""
        if not batch and not batch.touched:
            return
        saved = asyncio.get_running_loop().create_future()
        self._enqueue(batch, saved)
        await asyncio.shield(saved)

    def _enqueue(self, batch: Batch, saved: asyncio.Future[None] | None) -> None:
        """Group commit: one pipeline in flight at a time; the batches that arrive meanwhile go
        together in the next one. Under load a pipeline then carries many steps' and rounds' writes
        (one round trip instead of one each), and since every write goes through this one line,
        Redis applies them in the order memory changed."""
        self._pending.append((batch, saved))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="redis-commits")

    async def _flush(self) -> None:
        try:
            while self._pending or self._unsaved:
                group, self._pending = self._pending, []
                if self._unsaved:  # before every write that could touch those requests
                    group.insert(0, (self._unsaved, None))
                    self._unsaved = Batch()
                await self._save(group)
        finally:
            self._flusher = None
            if self._pending:  # cancelled with batches waiting: they still go (``drain`` waits)
                self._flusher = asyncio.create_task(self._flush(), name="redis-commits")

    async def _save(self, group: list[tuple[Batch, asyncio.Future[None] | None]]) -> None:
        try:
            await self.store.commit_many([batch for batch, _ in group])
        except Unavailable as exc:  # only when the store is closing: the next scheduler recovers
            log.warning("%d commits were dropped at shutdown: %s", len(group), exc)
        except BaseException as exc:
            for _, saved in group:
                if saved is not None and not saved.done():
                    error = exc if isinstance(exc, Exception) else Unavailable("commit cancelled")
                    saved.set_exception(error)
                    saved.exception()  # retrieved: a caller that went away must not log it again
            raise
        else:
            for batch, _ in group:
                for state, upto, finish in batch.touched.values():
                    state.publish(upto, finish)
        for _, saved in group:
            if saved is not None and not saved.done():
                saved.set_result(None)

    # ---- admit ----
    def admit(self, state: RequestState) -> None:
        """A request just stored by admission joins the queue (or ends, if it was cancelled already)."""
        request_id = state.request_id
        self.requests[request_id] = state
        self.queue.push(request_id, state.record.arrival_time, requeue=True)  # the limit was checked
        self.metrics.queue_length.set(len(self.queue))
        if request_id in self._cancel_pending:
            self._cancel_pending.discard(request_id)
            batch = Batch()
            state.cancelled = True
            self.finish(state, FinishReason.ABORT, batch)
            self._spawn_commit(batch)
            return
        self._wake()

    def admit_new(self, state: RequestState) -> None:
        """Admit a request whose id the scheduler just chose (no client can know it, so nothing
        can be stored under it): without its own Redis call first. Its record rides in front of
        the next commit, which is the round's that dispatches it unless another comes first, and
        is saved before any write about it; its streams send nothing before then (they send what
        commits published). The flush is started after the round this admission wakes has run."""
        self._unsaved.create(state.record, state.record.arrival_time)
        self.admit(state)
        asyncio.get_running_loop().call_soon(self._flush_unsaved)

    def _flush_unsaved(self) -> None:
        if self._unsaved and self._flusher is None:  # else they ride the group after the one out
            self._flusher = asyncio.create_task(self._flush(), name="redis-commits")

    def _spawn_commit(self, batch: Batch) -> None:
        self._enqueue(batch, None)

    # ---- cancel ----
    async def cancel(self, request_id: str) -> tuple[bool, tuple[str, str] | None]:
        """Cancel; (whether it was cancelled, (worker id, worker-side id) when a worker runs it)."""
        state = self.requests.get(request_id)
        if state is None:
            record = await self.store.get_request(request_id)
            if record is None:
                raise NotFound(f"unknown request id {request_id!r}")
            if record.status == "finished":
                return False, None
            state = self.requests.get(request_id)  # admission may have finished while we read
            if state is None:
                # Stored by a Generate still on its way into memory: ``admit`` cancels it.
                self._cancel_pending.add(request_id)
                return True, None
        if state.finished:
            return False, None
        state.cancelled = True
        was_running = state.record.status == RUNNING
        running = (state.record.worker_id, state.worker_request_id) if was_running else None
        batch = Batch()
        self.finish(state, FinishReason.ABORT, batch)
        await self.commit(batch)
        return True, running

    # ---- finish / requeue ----
    def finish(self, state: RequestState, reason: FinishReason, batch: Batch, error: str = "") -> None:
        self.queue.remove(state.request_id)
        if state.record.worker_id:
            self.ledger.release(state.record.worker_id, state.worker_request_id)
        state.finish(reason, error)
        record = state.record
        batch.update(record, "status", "finish_reason", "error", "finish_time", "output_tokens")
        batch.finished.add(record.request_id)
        batch.finished_of(state)
        self.metrics.series(self.metrics.requests, reason.value).inc()
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

    def requeue(self, state: RequestState, batch: Batch) -> None:
        """Back to the queue as a new attempt (its worker failed, or may hold the old attempt): the
        next attempt regenerates from prompt + the saved log."""
        record = state.record
        record.requeues += 1
        record.status, record.worker_id, record.placement = WAITING, "", ""
        batch.update(record, "requeues", "status", "worker_id", "placement")
        batch.running.discard(record.request_id)
        self.metrics.requeues.inc()
        if state.remaining_tokens <= 0:
            self.finish(state, FinishReason.LENGTH, batch)
            return
        self.queue.push(record.request_id, record.arrival_time, requeue=True)
        batch.enqueued[record.request_id] = record.arrival_time
        self.metrics.queue_length.set(len(self.queue))

    def back_to_queue(self, state: RequestState, batch: Batch) -> None:
        """A refused dispatch: the same attempt waits again (the worker never took it)."""
        record = state.record
        record.status, record.worker_id, record.placement = WAITING, "", ""
        if record.requeues == 0:  # no worker ever took it: it is still queueing
            record.dispatch_time = 0.0
        batch.update(record, "status", "worker_id", "placement", "dispatch_time")
        batch.running.discard(record.request_id)
        self.queue.push(record.request_id, record.arrival_time, requeue=True)
        batch.enqueued[record.request_id] = record.arrival_time

    # ---- recover ----
    async def recover(self) -> list[tuple[str, str]]:
        """Reload waiting and running requests; running ones restart from their token log as a new
        attempt. Returns the (worker id, worker-side id) of the attempts they leave behind."""
        batch = Batch()
        abandoned = []
        records = await self.store.active_requests()
        for record in records:
            state = RequestState(record, _sampling(record), await self.store.get_tokens(record.request_id))
            self.requests[record.request_id] = state
            if record.status == RUNNING:
                abandoned.append((record.worker_id, state.worker_request_id))
                self.requeue(state, batch)
            elif state.remaining_tokens <= 0:
                self.finish(state, FinishReason.LENGTH, batch)
            else:
                self.queue.push(record.request_id, record.arrival_time, requeue=True)
        await self.commit(batch)
        if records:
            log.info("recovered %d requests from Redis (%d waiting)", len(records), len(self.queue))
        return abandoned

    async def drain(self) -> None:
        """Wait for the commits in flight (bounded), so Redis holds what memory says."""
        if self._flusher is not None:
            await asyncio.wait({self._flusher}, timeout=2.0)


def _sampling(record: RequestRecord) -> SamplingParams:
    return sampling_from_dict(record.sampling)
