"""Prefills dispatched but not reported running yet are charged to the slack once and only once.

A real ``SchedulerCore`` (real redis-server) drives the ``layerkv`` policy against an in-memory
worker that reports late: it takes dispatches and says nothing until the test makes it report.
Rounds run one at a time, by hand, so what each round sees is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from common.config import SchedulerSettings
from common.metrics import ServiceMetrics
from common.store import RequestRecord, Store
from common.types import CostModel, Placement, SamplingParams, TierCapacity
from scheduler_svc.core import SchedulerCore
from scheduler_svc.inflight import InflightPrefills
from scheduler_svc.policies.base import PrefillInFlight
from scheduler_svc.requests import WAITING, RequestState
from scheduler_svc.testing.stub_worker import STUB_GEOMETRY
from scheduler_svc.worker_events import (
    DispatchCommand,
    RunningReport,
    TokenUpdate,
    WorkerDescription,
    WorkerEvent,
)
from scheduler_svc.worker_pool import WorkerHandle
from tests.test_core_without_grpc import FakeWorkers

LAYERS = STUB_GEOMETRY.num_layers
ALL_GPU = Placement.all_gpu(LAYERS)
# Decode steps of 0.25 s whatever the batch; prefill 2^-10 s per token (4096 tokens: 4.0 s).
COST = CostModel(prefill_per_token_s=2.0**-10, decode_base_s=0.25)


class LateWorker(FakeWorkers):
    """Takes every dispatch and reports nothing until the test calls ``report``."""

    async def dispatch(self, worker_id: str, command: DispatchCommand) -> None:
        self.dispatched.append(command)

    async def _connect(self, handle: WorkerHandle) -> None:
        handle.description = WorkerDescription(
            worker_id="late-0",
            model="fake",
            geometry=STUB_GEOMETRY,
            capacity=TierCapacity(1 << 20, 0),  # no host tier: every placement is all-GPU
            cost_model=COST,
            max_model_len=1 << 14,
            eos_token_id=0,
            vocab_size=100,
        )
        handle.healthy = True
        assert self.listener is not None
        await self.listener.worker_up(handle)
        handle.up.set()

    async def report(self, event: WorkerEvent) -> None:
        handle = self.by_id("late-0")
        assert handle is not None and self.listener is not None
        await self.listener.worker_event(handle, event)


async def submit(core: SchedulerCore, store: Store, request_id: str, prompt: int, max_tokens: int,
                 tpot_slo_s: float) -> None:
    now = time.time()
    record = RequestRecord(request_id=request_id, status=WAITING, prompt_ids=[1] * prompt,
                           sampling={"max_tokens": max_tokens}, tpot_slo_s=tpot_slo_s, arrival_time=now)
    assert await store.create_request(record, now)
    core.admit(RequestState(record, SamplingParams(max_tokens=max_tokens)))


async def one_round(core: SchedulerCore) -> int:
    """One scheduling round, and its dispatch tasks run to the (fake) worker."""
    sent = await core.schedule_round()
    for _ in range(3):
        await asyncio.sleep(0)
    return sent


def running(rid: str, context: int, generated: int, decode_time_s: float) -> RunningReport:
    return RunningReport(rid, ALL_GPU, decode_time_s, context, generated)


@contextlib.asynccontextmanager
async def late_fleet(
    redis_url: str, **policy_params: object
) -> AsyncIterator[tuple[SchedulerCore, Store, LateWorker]]:
    """A core running ``layerkv`` with these parameters over one ``LateWorker``, already connected.

    No ``core.start()``: no background loop, every round is one the test runs."""
    settings = SchedulerSettings.build(
        redis_url=redis_url, workers=[], policy="layerkv", metrics_port=0, port=0, host="127.0.0.1",
        policy_params=policy_params,
    )
    store = Store(settings.redis_url, settings.redis_prefix, settings.retention_s)
    worker = LateWorker()
    core = SchedulerCore(settings, store, ServiceMetrics("scheduler"), client=worker, pool=worker.bind)
    try:
        await core.pool.add_and_wait("late:1")
        yield core, store, worker
    finally:
        await core.stop()
        await store.close()


@pytest.mark.asyncio
async def test_two_rounds_never_admit_more_prefill_than_the_smallest_slack(redis_url: str) -> None:
    params = {"prefill_safety": 1.0, "output_prediction": "max_tokens"}
    async with late_fleet(redis_url, **params) as (core, store, worker):
        # r0 runs and reports: 11 of 21 tokens, 0.5 s of decode, SLO 0.5 s: its slack is
        # 0.5·20 − 0.5 − 10·0.25 = 7.0 s, the only (so the smallest) slack on the worker.
        await submit(core, store, "r0", 16, 21, 0.5)
        assert await one_round(core) == 1
        await worker.report(WorkerEvent(
            tokens=(TokenUpdate("r0@0", tuple([5] * 11), False, None),),
            running=(running("r0@0", 27, 11, 0.5),), admitted=("r0@0",),
        ))

        # a and b: 4.0 s of prefill each (their own SLOs are loose): each alone fits 7.0 s.
        await submit(core, store, "a", 4096, 4, 100.0)
        assert await one_round(core) == 1  # a goes
        await submit(core, store, "b", 4096, 4, 100.0)
        # The worker has not reported a (late): its 4.0 s are still charged, b must wait.
        for _ in range(3):
            assert await one_round(core) == 0
        assert [c.worker_request_id for c in worker.dispatched] == ["r0@0", "a@0"]
        (snap,) = core.snapshot().workers
        assert [f.request_id for f in snap.prefilling] == ["a"]
        assert [r.request_id for r in snap.running] == ["r0"]

        # A report that predates a (r0 one token on, a not in it) changes nothing.
        await worker.report(WorkerEvent(
            tokens=(TokenUpdate("r0@0", (5,), False, None),), running=(running("r0@0", 28, 12, 0.75),),
        ))
        assert await one_round(core) == 0

        # a is reported running: its prefill took 1.0 s of r0's decode time (faster than predicted).
        # r0's slack is now 0.5·20 − 1.75 − 9·0.25 = 6.0 s, charged in T_past only: b (4.0 s) goes.
        await worker.report(WorkerEvent(
            tokens=(TokenUpdate("r0@0", (5,), False, None), TokenUpdate("a@0", (5,), False, None)),
            running=(running("r0@0", 29, 13, 1.75), running("a@0", 4097, 1, 0.0)), admitted=("a@0",),
        ))
        (snap,) = core.snapshot().workers
        assert snap.prefilling == ()
        assert await one_round(core) == 1
        assert [c.worker_request_id for c in worker.dispatched] == ["r0@0", "a@0", "b@0"]


@pytest.mark.asyncio
async def test_without_the_gate_the_late_worker_takes_both(redis_url: str) -> None:
    # The same fleet with slack_gate off: the budget alone decides, a and b go in one round.
    async with late_fleet(redis_url, slack_gate=False) as (core, store, _worker):
        await submit(core, store, "r0", 16, 21, 0.5)
        assert await one_round(core) == 1
        await submit(core, store, "a", 4096, 4, 100.0)
        await submit(core, store, "b", 4096, 4, 100.0)
        assert await one_round(core) == 2


# ---- the tracker itself --------------------------------------------------------------------------


def prefill(request_id: str) -> PrefillInFlight:
    return PrefillInFlight(request_id, 64, 8, ALL_GPU, None, 0.0)


@pytest.mark.parametrize(
    ("reported", "dead", "left"),
    [
        ((), (), ["a", "b", "c"]),  # nothing reported: all in flight, oldest first
        (("b@0",), (), ["a", "c"]),  # b reported running: its prefill is done
        ((), ("a@0",), ["b", "c"]),  # a finished, refused, requeued or moved: no longer live
        (("a@0", "b@0", "c@0"), (), []),
        (("z@0",), ("c@0",), ["a", "b"]),  # an unknown running id changes nothing
    ],
)
def test_tracker_forgets_reported_and_dead_attempts(
    reported: tuple[str, ...], dead: tuple[str, ...], left: list[str]
) -> None:
    tracker = InflightPrefills()
    for name in "abc":
        tracker.add("w", f"{name}@0", prefill(name))
    tracker.add("other", "x@0", prefill("x"))
    reports = [running(rid, 65, 1, 0.0) for rid in reported]
    got = tracker.of("w", reports, lambda _w, rid: rid not in dead)
    assert [f.request_id for f in got] == left
    assert len(tracker) == len(left) + 1  # forgotten for good; the other worker is untouched
    assert [f.request_id for f in tracker.of("other", [], lambda _w, _r: True)] == ["x"]


@pytest.mark.asyncio
async def test_a_removed_worker_leaves_no_prefill_in_flight(redis_url: str) -> None:
    # A worker removed from the fleet is never asked about again: its in-flight entries must go
    # with it, or the tracker grows by every dispatch a lost worker never reported.
    async with late_fleet(redis_url) as (core, store, worker):
        await submit(core, store, "a", 64, 4, 100.0)
        assert await one_round(core) == 1
        assert len(core.scheduling.inflight) == 1  # dispatched, not reported running
        await worker.remove("late:1")
        assert core.snapshot().workers == ()
        assert len(core.scheduling.inflight) == 0
