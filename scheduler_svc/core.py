"""The scheduler's core: the state of one scheduler and the pieces that act on it.

``SchedulerCore`` wires three pieces that talk through typed values: the request lifecycle
(``lifecycle.py``: admit, cancel, finish, requeue, recover, saving), the scheduling round
(``rounds.py``) and worker-event intake (``intake.py``, fed ``WorkerEvent`` values decoded by
``wire.py``). The store, the worker registry (as a factory given the core as its listener) and
the worker client are injected, so the core runs without gRPC in tests. The servicers only
translate between their messages and these calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from common.config import SchedulerSettings
from common.metrics import ServiceMetrics
from common.store import Store
from common.tokenizer import Tokenizer
from common.types import FinishReason
from scheduler_svc.fit_check import FitCheck, never_fits_anywhere
from scheduler_svc.intake import EventIntake
from scheduler_svc.ledger import Ledger
from scheduler_svc.lifecycle import Batch, Lifecycle
from scheduler_svc.policies.base import FleetSnapshot, Policy
from scheduler_svc.policies.registry import make_policy, policy_params
from scheduler_svc.requests import RequestState, StreamChunk, StreamFinal, stream_from
from scheduler_svc.rounds import Rounds
from scheduler_svc.waiting_queue import WaitingQueue
from scheduler_svc.worker_client import ChannelSecurity, GrpcWorkerClient, WorkerClient
from scheduler_svc.worker_events import WorkerEvent
from scheduler_svc.worker_pool import (
    RegistryFactory,
    WorkerHandle,
    WorkerListener,
    WorkerPool,
    WorkerRegistry,
)

log = logging.getLogger(__name__)


class SchedulerCore:
    """State and mechanism of one scheduler; the gRPC servicers are thin wrappers around it."""

    def __init__(
        self,
        settings: SchedulerSettings,
        store: Store,
        metrics: ServiceMetrics,
        client: WorkerClient | None = None,
        pool: RegistryFactory | None = None,
    ) -> None:
        """``pool`` builds the worker registry (default: a gRPC ``WorkerPool`` dialling with the
        settings' security); ``client`` sends dispatches and aborts (default: over that registry)."""
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.ledger = Ledger()
        self.lifecycle = Lifecycle(store, self.ledger, metrics, settings.queue_limit, self.wake)
        self.pool: WorkerRegistry = (pool or self._grpc_pool)(self)
        self.client: WorkerClient = client if client is not None else GrpcWorkerClient(self.pool)
        self.policy: Policy = make_policy(settings.policy, settings.policy_params)
        self.fit_check = FitCheck()  # admission's never-fits check, remembered per request size
        self._tasks: set[asyncio.Task[None]] = set()
        self.intake = EventIntake(self.lifecycle, self.ledger, metrics, self._abort, self._spawn, self.wake)
        self.scheduling = Rounds(
            self.lifecycle,
            self.ledger,
            self.pool,
            self.client,
            lambda: self.policy,
            self.intake.running_of,
            self._spawn,
            self.wake,
        )
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self.stopped = False

    def _grpc_pool(self, listener: WorkerListener) -> WorkerRegistry:
        settings = self.settings
        return WorkerPool(
            listener,
            ChannelSecurity(
                settings.tls_ca,
                settings.tls_cert if settings.tls_ca else "",
                settings.tls_key if settings.tls_ca else "",
                settings.worker_server_name,
                settings.worker_token,
            ),
            retry_s=settings.worker_retry_s,
            registered_ttl_s=settings.registered_worker_ttl_s,
            silence_limit_s=settings.worker_silence_s,
        )

    # ---- the state the servicers and admission read ----
    @property
    def requests(self) -> dict[str, RequestState]:
        return self.lifecycle.requests

    @property
    def queue(self) -> WaitingQueue:
        return self.lifecycle.queue

    @property
    def rounds(self) -> int:
        return self.scheduling.rounds

    # ---- lifecycle ----
    async def start(self) -> None:
        await self.store.ping()
        self._monitor_task = asyncio.create_task(self.store.monitor(), name="redis-monitor")
        stored = await self.store.get_policy()
        if stored is not None:
            try:
                self.policy = make_policy(stored.name, stored.params)
            except Exception as exc:  # a stored policy this build no longer knows: keep the flag's
                log.warning("stored policy %r rejected (%s); using %r", stored.name, exc, self.policy.name)
        await self.store.set_policy(self.policy.name, policy_params(self.policy))
        await self.lifecycle.recover()  # attempts it leaves behind are aborted when their worker reports them
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
        self.lifecycle.frozen = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._wake.set()
            await asyncio.wait({self._loop_task}, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        await self.lifecycle.drain()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        await self.pool.close()

    def wake(self) -> None:
        self._wake.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a worker RPC in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # never die silently
            log.error("background task failed", exc_info=task.exception())

    async def _abort(self, worker_id: str, worker_rid: str) -> None:
        await self.scheduling.abort(worker_id, worker_rid)

    # ---- requests ----
    def admit(self, state: RequestState) -> None:
        """A request admission has just stored: into memory and the queue."""
        self.lifecycle.admit(state)

    async def cancel(self, request_id: str) -> bool:
        cancelled, running = await self.lifecycle.cancel(request_id)
        if running is not None:
            await self._abort(*running)
        return cancelled

    async def stream(
        self, state: RequestState, offset: int, tokenizer: Tokenizer | None
    ) -> AsyncIterator[StreamChunk | StreamFinal]:
        """A client's stream of a live request. When every client went away before the end (they
        disconnected, their deadline passed) and none re-attaches within the grace, it is cancelled."""
        state.streams += 1
        ended = False
        try:
            async for item in stream_from(state, offset, tokenizer):
                ended = isinstance(item, StreamFinal)
                yield item
        finally:
            state.streams -= 1
            if not ended and not state.streams and not state.finished and not self.stopped:
                self._spawn(self._cancel_if_abandoned(state))

    async def _cancel_if_abandoned(self, state: RequestState) -> None:
        await asyncio.sleep(self.settings.disconnect_grace_s)
        if state.streams or state.finished or self.stopped:
            return
        log.info("request %s: its clients went away; cancelling it", state.request_id)
        try:
            await self.cancel(state.request_id)
        except Exception as exc:  # it ends anyway at max_tokens
            log.warning("cancelling abandoned request %s failed: %s", state.request_id, exc)

    # ---- policies ----
    async def set_policy(self, name: str, params: dict[str, object]) -> tuple[Policy, Policy]:
        """Validate, persist and swap (takes effect at the next round); returns (previous, current)."""
        policy = make_policy(name, params)
        await self.store.set_policy(policy.name, policy_params(policy))
        previous, self.policy = self.policy, policy
        log.info("policy %s -> %s %s", previous.name, policy.name, policy_params(policy))
        await self._end_never_fitting()
        self.wake()
        return previous, policy

    async def _end_never_fitting(self) -> None:
        """After a swap: waiting requests no worker could ever hold under the new policy end now
        (with an error naming the limit) instead of waiting until their client gives up."""
        workers = [h.description for h in self.pool.handles() if h.accepting and h.description is not None]
        batch = Batch()
        for request_id in list(self.queue):
            state = self.requests[request_id]
            limit = never_fits_anywhere(self.policy, workers, len(state.context_ids) + state.remaining_tokens)
            if limit is not None:
                self.lifecycle.finish(
                    state, FinishReason.ERROR, batch, f"can never be held by any worker {limit}"
                )
        await self.lifecycle.commit(batch)

    # ---- rounds ----
    async def _schedule_loop(self) -> None:
        # Checks ``stopped`` too: Python 3.11's wait_for can swallow a cancellation that lands as its
        # timeout fires, and a loop that only relied on cancel() would then run (and hang stop()) forever.
        while not self.stopped:
            if not self._wake.is_set():  # under load it is: no timer, no wait
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # a timer, not a task per round as wait_for
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self.schedule_round()
            except Exception:  # keep scheduling; the failure is logged with its traceback
                log.exception("scheduling round failed")
                await asyncio.sleep(self.settings.round_interval_s)

    def snapshot(self) -> FleetSnapshot:
        return self.scheduling.snapshot()

    async def schedule_round(self) -> int:
        """One round; returns the number of dispatches sent."""
        return await self.scheduling.schedule_round()

    # ---- WorkerListener (the pool's callbacks; never raise: a bug here must not drop a worker) ----
    async def worker_up(self, worker: WorkerHandle) -> None:
        await self.intake.worker_up(worker)

    async def worker_down(self, worker: WorkerHandle) -> None:
        try:
            await self.intake.worker_down(worker)
        except Exception:
            log.exception("requeueing the requests of worker %s failed", worker.worker_id)

    async def worker_event(self, worker: WorkerHandle, event: WorkerEvent) -> None:
        await self.intake.worker_event(worker, event)
