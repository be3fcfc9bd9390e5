"""SchedulerCore driven without gRPC: an in-memory fake worker registry and client, a real
redis-server. A request is admitted, dispatched to the fake worker, fed typed ``WorkerEvent``s
with its tokens, finishes, and its tokens and final record are in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from common.config import SchedulerSettings
from common.metrics import ServiceMetrics
from common.store import RequestRecord, Store
from common.types import CostModel, FinishReason, Placement, SamplingParams, TierCapacity
from scheduler_svc.core import SchedulerCore
from scheduler_svc.requests import FINISHED, WAITING, RequestState, StreamChunk, StreamFinal
from scheduler_svc.testing.stub_worker import STUB_GEOMETRY
from scheduler_svc.worker_events import (
    DispatchCommand,
    RunningReport,
    TierReport,
    TokenUpdate,
    WorkerDescription,
    WorkerEvent,
)
from scheduler_svc.worker_pool import WorkerHandle, WorkerListener

GPU_BLOCKS = 64
OUTPUT = (7, 8, 9, 10)  # what the fake worker generates, one token per event


@contextlib.asynccontextmanager
async def fake_core(redis_url: str, fake: Any) -> AsyncIterator[tuple[SchedulerCore, Store]]:
    """A started SchedulerCore (fcfs-full, no gRPC) over ``fake`` (its registry and client) and a
    real Redis; stopped, with its store, on exit."""
    settings = SchedulerSettings.build(redis_url=redis_url, workers=["fake:1"], policy="fcfs-full",
                                       metrics_port=0, port=0, host="127.0.0.1")
    store = Store(settings.redis_url, settings.redis_prefix, settings.retention_s)
    core = SchedulerCore(settings, store, ServiceMetrics("scheduler"), client=fake, pool=fake.bind)
    await core.start()
    try:
        yield core, store
    finally:
        await core.stop()
        await store.close()


async def stored_request(store: Store, request_id: str, prompt: list[int], max_tokens: int) -> RequestState:
    """A waiting request created in Redis, as admission would create it."""
    now = time.time()
    record = RequestRecord(request_id=request_id, status=WAITING, prompt_ids=prompt,
                           sampling={"max_tokens": max_tokens}, arrival_time=now)
    assert await store.create_request(record, now)
    return RequestState(record, SamplingParams(max_tokens=max_tokens))


class FakeWorkers:
    """One in-memory worker, as both the core's registry and its client: a dispatch is recorded and
    answered with typed events (admitted, then one token per event, then the end)."""

    def __init__(self) -> None:
        self.listener: WorkerListener | None = None
        self.on_drop: Callable[[str], Awaitable[None]] | None = None
        self.dispatched: list[DispatchCommand] = []
        self.aborted: list[str] = []
        self._handles: dict[str, WorkerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, listener: WorkerListener) -> FakeWorkers:  # the core's registry factory
        self.listener = listener
        return self

    # ---- WorkerRegistry ----
    def handles(self) -> list[WorkerHandle]:
        return list(self._handles.values())

    def by_id(self, worker_id: str) -> WorkerHandle | None:
        return next((h for h in self._handles.values() if h.worker_id == worker_id), None)

    def add(self, address: str, registered: bool = False) -> WorkerHandle:
        handle = self._handles.get(address)
        if handle is None:
            handle = WorkerHandle(address, registered=registered)
            self._handles[address] = handle
            self._spawn(self._connect(handle))
        return handle

    async def add_and_wait(
        self, address: str, timeout_s: float = 10.0, registered: bool = False
    ) -> WorkerHandle:
        handle = self.add(address, registered)
        await asyncio.wait_for(handle.up.wait(), timeout_s)
        return handle

    async def remove(self, address: str) -> None:
        self._handles.pop(address, None)

    def start_dns(self, name_port: str, interval_s: float) -> None:
        raise AssertionError("not used here")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # ---- WorkerClient ----
    async def dispatch(self, worker_id: str, command: DispatchCommand) -> None:
        self.dispatched.append(command)
        self._spawn(self._run(worker_id, command))

    async def abort(self, worker_id: str, worker_request_id: str) -> None:
        self.aborted.append(worker_request_id)

    # ---- the fake worker ----
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, handle: WorkerHandle) -> None:
        handle.description = WorkerDescription(
            worker_id="fake-0",
            model="fake",
            geometry=STUB_GEOMETRY,
            capacity=TierCapacity(GPU_BLOCKS, 0),
            cost_model=CostModel(),
            max_model_len=256,
            eos_token_id=0,
            vocab_size=100,
        )
        handle.healthy = True
        assert self.listener is not None
        await self.listener.worker_up(handle)
        handle.up.set()

    async def _run(self, worker_id: str, command: DispatchCommand) -> None:
        handle = self.by_id(worker_id)
        assert handle is not None and self.listener is not None
        rid = command.worker_request_id
        context = len(command.prompt_ids)
        placement = Placement.all_gpu(STUB_GEOMETRY.num_layers)

        def running(generated: int) -> RunningReport:
            return RunningReport(rid, placement, 0.0, context + generated, generated)

        gpu = TierReport(GPU_BLOCKS, GPU_BLOCKS - 2, (2,) * STUB_GEOMETRY.num_layers)
        await self.listener.worker_event(handle, WorkerEvent(running=(running(0),), gpu=gpu, admitted=(rid,)))
        for i, token in enumerate(OUTPUT[: command.max_tokens]):
            last = i + 1 == min(len(OUTPUT), command.max_tokens)
            update = TokenUpdate(rid, (token,), last, FinishReason.LENGTH if last else None)
            report = () if last else (running(i + 1),)
            free = TierReport(GPU_BLOCKS, GPU_BLOCKS, (0,) * STUB_GEOMETRY.num_layers)
            await self.listener.worker_event(
                handle, WorkerEvent(tokens=(update,), running=report, gpu=free if last else gpu)
            )


@pytest.mark.asyncio
async def test_request_runs_through_a_fake_worker_and_its_tokens_are_in_redis(redis_url: str) -> None:
    fake = FakeWorkers()
    async with fake_core(redis_url, fake) as (core, store):
        handle = await core.pool.add_and_wait("fake:1")
        assert handle.accepting and core.ledger.get("fake-0") is not None

        prompt = [1, 2, 3, 4, 5]
        state = await stored_request(store, "r1", prompt, len(OUTPUT))
        core.admit(state)

        items = [item async for item in core.stream(state, 0, None)]
        chunks = [i for i in items if isinstance(i, StreamChunk)]
        final = items[-1]
        assert isinstance(final, StreamFinal)
        assert [t for c in chunks for t in c.token_ids] == list(OUTPUT)

        assert len(fake.dispatched) == 1
        command = fake.dispatched[0]
        assert command.worker_request_id == "r1@0"
        assert command.prompt_ids == tuple(prompt) and command.max_tokens == len(OUTPUT)
        assert fake.aborted == []

        assert await store.get_tokens("r1") == list(OUTPUT)
        stored = await store.get_request("r1")
        assert stored is not None
        assert stored.status == FINISHED and stored.finish_reason == FinishReason.LENGTH.value
        assert stored.worker_id == "fake-0" and stored.output_tokens == len(OUTPUT)
        assert state.finished and len(core.queue) == 0
        budget = core.ledger.get("fake-0")
        assert budget is not None and budget.gpu_free == GPU_BLOCKS  # the reservation was released
