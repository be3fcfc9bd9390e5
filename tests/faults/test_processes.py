"""Faults with real processes: workers killed or hung, the scheduler killed, Redis killed or stalled.

Each test loads the fleet, injects one fault mid-stream and asserts that no request was lost, no
token offset duplicated or skipped, every output equals an undisturbed run (greedy and seeded
sampling), every stream ended, all blocks came back and Redis holds only live keys.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.faults.harness import (
    SILENCE_S,
    FaultFleet,
    assert_healed,
    assert_outputs,
    jobs,
    run_all,
    undisturbed,
    wait_tokens,
)

pytestmark = pytest.mark.slow


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            )
        except grpc.RpcError:
            return -1


def _requeues(fleet: FaultFleet, request_ids: list[str]) -> list[int]:
    return [fleet.request_info(rid).requeues for rid in request_ids]


async def test_worker_sigkill_mid_stream(fleet: FaultFleet) -> None:
    todo = jobs("wkill")
    for job in todo:
        undisturbed(job)
    tasks = await run_all(fleet, todo)
    await wait_tokens(fleet, todo[0].request_id, 3)
    victim = fleet.workers[0]
    await asyncio.to_thread(victim.kill)
    results = await asyncio.gather(*tasks)
    assert_outputs(results, todo)
    await asyncio.to_thread(victim.start)
    await asyncio.to_thread(assert_healed, fleet, 180)


async def test_worker_sigstop_past_liveness_then_sigcont(fleet: FaultFleet) -> None:
    """The hung worker is declared down and its requests rerun elsewhere; once resumed it must
    stop the abandoned attempts and give their blocks back."""
    todo = jobs("wstop")
    for job in todo:
        undisturbed(job)
    tasks = await run_all(fleet, todo)
    await wait_tokens(fleet, todo[0].request_id, 2)
    hung = fleet.workers[0]
    hung.pause()
    try:
        await asyncio.sleep(SILENCE_S + 2.5)
    finally:
        hung.resume()
    results = await asyncio.gather(*tasks)
    assert_outputs(results, todo)
    await asyncio.to_thread(assert_healed, fleet, 60)


async def test_scheduler_sigkill_and_restart_clients_reattach(fleet: FaultFleet) -> None:
    todo = jobs("skill")
    for job in todo:
        undisturbed(job)
    tasks = await run_all(fleet, todo)
    await wait_tokens(fleet, todo[1].request_id, 3)
    await asyncio.to_thread(fleet.scheduler.restart)
    await asyncio.to_thread(fleet.scheduler.wait_serving, 60)
    results = await asyncio.gather(*tasks)
    assert_outputs(results, todo)
    await asyncio.to_thread(assert_healed, fleet, 60)


async def test_redis_sigkill_and_restart(fleet: FaultFleet) -> None:
    """A Redis restart (the append-only file keeps what was saved) is waited out: no worker is
    marked down for it, so no request is requeued."""
    todo = jobs("rkill")
    for job in todo:
        undisturbed(job)
    tasks = await run_all(fleet, todo)
    await wait_tokens(fleet, todo[0].request_id, 3)
    await asyncio.to_thread(fleet.redis.kill)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(fleet.redis.start)
    results = await asyncio.gather(*tasks)
    assert_outputs(results, todo)
    assert _requeues(fleet, [j.request_id for j in todo]) == [0] * len(todo)
    await asyncio.to_thread(assert_healed, fleet, 60)


async def test_redis_sigstop_5s(fleet: FaultFleet) -> None:
    """A stalled Redis: health says NOT_SERVING during the stall and SERVING after; nothing is
    requeued, no worker is marked down."""
    todo = jobs("rstop")
    for job in todo:
        undisturbed(job)
    tasks = await run_all(fleet, todo)
    await wait_tokens(fleet, todo[0].request_id, 3)
    fleet.redis.pause()
    statuses = []
    try:
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            statuses.append(await asyncio.to_thread(_health, fleet.address))
            await asyncio.sleep(0.25)
    finally:
        fleet.redis.resume()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
    results = await asyncio.gather(*tasks)
    assert_outputs(results, todo)
    assert _requeues(fleet, [j.request_id for j in todo]) == [0] * len(todo)
    deadline = time.monotonic() + 10
    while _health(fleet.address) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "health never came back to SERVING"
        await asyncio.sleep(0.2)
    assert all(w.healthy for w in fleet.workers_info())
    await asyncio.to_thread(assert_healed, fleet, 60)


async def test_both_workers_killed_then_one_restarted(fleet: FaultFleet) -> None:
    todo = jobs("both")
    for job in todo:
        undisturbed(job)
    tasks = await run_all(fleet, todo)
    await wait_tokens(fleet, todo[0].request_id, 3)
    for w in fleet.workers:
        await asyncio.to_thread(w.kill)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(fleet.workers[1].start)
    results = await asyncio.gather(*tasks)
    assert_outputs(results, todo)
    await asyncio.to_thread(fleet.workers[0].start)
    await asyncio.to_thread(assert_healed, fleet, 180)
