"""Re-profiling a worker through the scheduler's AdminService, on real gRPC servers on port 0 (a
real worker engine, a real scheduler, a real redis-server): an idle worker is re-measured and the
scheduler's online fit restarts from the new profile; a busy one is refused with
FAILED_PRECONDITION naming the problem; ``layerkv workers`` shows the profile, the estimate and the
fit's error."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.config import SchedulerSettings, WorkerSettings
from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from scheduler_svc.server import SchedulerServer
from scheduler_svc.server import create_server as create_scheduler
from scheduler_svc.testing.fleet import collect, generate_request
from tests.fleet import make_engine
from worker_svc.server import WorkerServer
from worker_svc.server import create_server as create_worker

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60.0


@dataclass
class System:
    worker: WorkerServer
    scheduler: SchedulerServer
    address: str
    channel: grpc.aio.Channel
    worker_channel: grpc.aio.Channel

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def client(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    async def info(self) -> admin_pb2.WorkerInfo:
        (worker,) = (await self.admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=TIMEOUT_S)).workers
        return worker


@pytest.fixture
async def system(redis_url: str) -> AsyncIterator[System]:
    # The engine starts with --profile off (the defaults); the admin request measures it.
    engine = make_engine(gpu_blocks=256, host_blocks=256, max_model_len=1024, profile_budget_s=0.3)
    worker, port = await create_worker(
        WorkerSettings.build(host="127.0.0.1", port=0, metrics_port=0, worker_id="w-prof"), engine=engine)
    scheduler, sched_port = await create_scheduler(SchedulerSettings.build(
        host="127.0.0.1", port=0, metrics_port=0, redis_url=redis_url, workers=[f"127.0.0.1:{port}"],
        worker_retry_s=0.2))
    address = f"127.0.0.1:{sched_port}"
    system = System(worker, scheduler, address, grpc.aio.insecure_channel(address),
                    grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    for _ in range(200):
        if (await system.admin.ListWorkers(admin_pb2.ListWorkersRequest())).workers[0].healthy:
            break
        await asyncio.sleep(0.05)
    yield system
    await system.channel.close(None)
    await system.worker_channel.close(None)
    await scheduler.stop(0)
    await worker.stop(0)


async def test_idle_worker_is_reprofiled_and_the_fit_restarts_from_it(system: System) -> None:
    before = await system.info()
    assert before.profile.source == "default" and before.profile.measured_unix_s == 0
    results = await asyncio.gather(*(collect(system.client.Generate(generate_request([i + 1] * 40, 12)))
                                     for i in range(3)))
    assert all(len(tokens) == 12 for tokens, _ in results)
    fitted = await system.info()
    # The scheduler predicted each measured step before folding it in, and reports how well it did.
    assert fitted.fit.steps_fitted > 0 and fitted.fit.decode_steps > 0 and fitted.fit.prefill_steps > 0
    assert fitted.fit.decode_error > 0 and fitted.fit.window == 64
    assert fitted.cost_model != fitted.profiled_cost_model  # the estimate moved off the defaults

    reply = await system.admin.ProfileWorker(admin_pb2.ProfileWorkerRequest(worker_id="w-prof"),
                                             timeout=TIMEOUT_S)
    after = reply.worker
    assert after.profile.source == "measured" and after.profile.duration_s > 0
    assert after.profile.measured_unix_s > 0
    assert after.profiled_cost_model != before.profiled_cost_model
    # The fit restarted from the new profile: no steps yet, and the estimate is the profile.
    assert after.fit.steps_fitted == 0 and after.fit.decode_steps == 0
    assert after.cost_model == after.profiled_cost_model
    # The worker itself describes the new profile from now on (a reconnecting scheduler sees it).
    described = await worker_pb2_grpc.WorkerServiceStub(system.worker_channel).Describe(
        worker_pb2.DescribeRequest(), timeout=TIMEOUT_S)
    assert described.profile.source == "measured" and described.cost_model == after.profiled_cost_model
    assert (await system.info()).profiled_cost_model == after.profiled_cost_model
    # And it keeps serving.
    tokens, _ = await collect(system.client.Generate(generate_request([5] * 10, 4)))
    assert len(tokens) == 4
    # A profile holds dispatches while it runs: another one right away is refused, saying why.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await system.admin.ProfileWorker(admin_pb2.ProfileWorkerRequest(worker_id="w-prof"), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "at most one re-profile per 10 s" in (err.value.details() or "")


async def test_busy_worker_refuses_to_profile_naming_the_problem(system: System) -> None:
    call = system.client.Generate(generate_request([3] * 16, 900, request_id="long"))
    for _ in range(400):
        if "long" in (await system.info()).running_request_ids:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await system.admin.ProfileWorker(admin_pb2.ProfileWorkerRequest(worker_id="w-prof"), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not idle" in (err.value.details() or "") and "drain" in (err.value.details() or "")
    assert (await system.info()).profile.source == "default"  # nothing changed
    call.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await system.admin.ProfileWorker(admin_pb2.ProfileWorkerRequest(worker_id="nobody"), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nobody" in (err.value.details() or "")


async def cli(*args: str) -> tuple[int, str, str]:
    # subprocess.run in a thread (see test_scheduler_admin.cli: uvloop's fork is unsafe here)
    env = {**os.environ, "COLUMNS": "400"}
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "layerkv", *args], cwd=REPO,
                                   env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


async def test_workers_command_shows_profile_estimate_and_error(system: System) -> None:
    code, out, err = await cli("workers", "profile", "w-prof", "--endpoint", system.address)
    assert code == 0, err
    assert out.startswith("w-prof\tprofiled in") and "decode step (batch 1)" in out
    await collect(system.client.Generate(generate_request([7] * 30, 10)))
    info = await system.info()
    code, out, err = await cli("workers", "--endpoint", system.address)
    assert code == 0, err
    assert "measured" in out  # the profile's source
    fit_ms = f"{info.cost_model.decode_base_s * 1e3 + info.cost_model.decode_per_request_s * 1e3:.2f}"
    assert fit_ms in out  # the batch-1 decode step of the current estimate
    assert f"{info.fit.decode_error * 100:.0f}% of {info.fit.decode_steps}" in out  # and its error
    assert "(last 64)" in out
