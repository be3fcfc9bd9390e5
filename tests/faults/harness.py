"""The fault suite's fleet and checks: real redis-server (append-only file), a real scheduler and two
real workers (tiny preset), careful clients that re-attach from their offset, and the invariants
every fault must leave intact (nothing lost, nothing duplicated, outputs as undisturbed, every
stream ended, all blocks free, only live keys in Redis)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import redis

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from common.types import SamplingParams
from layerkv.testing.processes import ServiceProcess, scheduler_process, wait_workers_healthy, worker_process
from layerkv.testing.redis_server import RedisServer
from tests.fleet import make_engine
from tests.streams import Streamed, stream_attach, token_request

MAX_TOKENS = 24
SILENCE_S = 4.0  # the scheduler's liveness timeout in this suite (workers beat every 2 s)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


@dataclass(frozen=True)
class Job:
    """One request of a scenario: its id, prompt and sampling (greedy, or seeded sampling)."""

    request_id: str
    prompt: tuple[int, ...]
    seed: int | None = None

    @property
    def sampling(self) -> SamplingParams:
        if self.seed is None:
            return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.9, seed=self.seed)

    def request(self) -> scheduler_pb2.GenerateRequest:
        extra: dict[str, Any] = {} if self.seed is None else {"temperature": 0.9, "seed": self.seed}
        return token_request(self.prompt, MAX_TOKENS, request_id=self.request_id, **extra)


def jobs(tag: str, count: int = 6) -> list[Job]:
    """Half greedy, half seeded; short prompts."""
    return [
        Job(
            f"{tag}-{i}",
            tuple((i * 37 + j * 11) % 250 for j in range(4 + i % 4)),
            None if i % 2 else 100 + i,
        )
        for i in range(count)
    ]


_REFERENCE: dict[Job, list[int]] = {}
_ENGINE: list[Any] = []


def undisturbed(job: Job) -> list[int]:
    """What an in-process engine (same weights as every worker) generates for ``job`` alone."""
    if job not in _REFERENCE:
        if not _ENGINE:
            _ENGINE.append(make_engine())
        engine = _ENGINE[0]
        rid = f"ref-{job.request_id}-{time.monotonic_ns()}"
        engine.add_request(rid, list(job.prompt), job.sampling)
        tokens: list[int] = []
        while engine.has_work():
            for out in engine.step().outputs:
                if out.request_id == rid:
                    tokens.extend(out.new_token_ids)
        _REFERENCE[job] = tokens
    return _REFERENCE[job]


@dataclass
class FaultFleet:
    """Redis, a scheduler and two workers, each a real process that a test may kill or stop."""

    folder: Path
    redis: RedisServer
    scheduler: ServiceProcess
    workers: list[ServiceProcess]
    prefix: str = ""
    seen_requests: set[str] = field(default_factory=set)

    @property
    def address(self) -> str:
        return self.scheduler.address

    def admin(self) -> tuple[grpc.Channel, admin_pb2_grpc.AdminServiceStub]:
        channel = grpc.insecure_channel(self.address)
        return channel, admin_pb2_grpc.AdminServiceStub(channel)

    def workers_info(self) -> list[admin_pb2.WorkerInfo]:
        channel, stub = self.admin()
        with channel:
            return list(stub.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=5).workers)

    def request_info(self, request_id: str) -> scheduler_pb2.RequestInfo:
        with grpc.insecure_channel(self.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            return stub.GetRequest(scheduler_pb2.GetRequestRequest(request_id=request_id), timeout=5).request

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.scheduler.stop()
        self.redis.stop()


def start_fault_fleet(folder: Path) -> FaultFleet:
    redis_server = RedisServer(folder, appendonly=True).start()
    workers = [worker_process(folder, f"worker-{i}", gpu_blocks=512, host_blocks=128) for i in range(2)]
    scheduler = scheduler_process(
        folder, redis_server.url, "--policy", "least-loaded", "--worker-silence-s", str(SILENCE_S),
        "--disconnect-grace-s", "0.5", workers=[w.address for w in workers],
    )  # fmt: skip
    fleet = FaultFleet(folder, redis_server, scheduler, workers, prefix=f"t{scheduler.port}")
    try:
        for w in workers:
            w.start()
        scheduler.start()
        for w in workers:
            w.wait_serving(180)
        scheduler.wait_serving(60)
        wait_workers_healthy(scheduler.address, 2, 120)
    except BaseException:
        fleet.stop()
        raise
    return fleet


async def careful_client(address: str, job: Job, deadline_s: float = 120.0) -> Streamed:
    """Generate; on a broken stream re-attach from the offset reached (retrying while the scheduler
    is away); when the scheduler never stored it (NOT_FOUND before any token), Generate again with
    the same id (idempotent). ``Streamed.take`` fails on any duplicated or missing offset."""
    seen = Streamed(request_id=job.request_id)
    submit = True
    deadline = time.monotonic() + deadline_s
    while seen.final is None:
        assert time.monotonic() < deadline, f"{job.request_id} unfinished ({len(seen.token_ids)} tokens)"
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                if submit:
                    async for msg in stub.Generate(job.request(), timeout=deadline_s):
                        seen.take(msg)
                else:
                    await stream_attach(stub, job.request_id, seen, timeout_s=deadline_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND and not submit and not seen.token_ids:
                submit = True
                continue
            assert err.code() in RETRYABLE, f"{job.request_id}: {err.code()} {err.details()}"
            await asyncio.sleep(0.2)
            submit = False
    return seen


async def wait_tokens(fleet: FaultFleet, request_id: str, at_least: int = 1, timeout_s: float = 60.0) -> None:
    """Until the scheduler reports ``at_least`` output tokens of ``request_id`` (it is mid-stream)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await asyncio.to_thread(fleet.request_info, request_id)).output_tokens >= at_least:
                return
        except grpc.RpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{request_id} produced no tokens in {timeout_s} s")


def assert_outputs(results: list[Streamed], todo: list[Job]) -> None:
    """Every request complete, ended with a final message, equal to an undisturbed run."""
    for got, job in zip(results, todo, strict=True):
        assert got.final is not None, f"{job.request_id}: the stream never ended"
        assert got.final.finish_reason == types_pb2.FINISH_REASON_LENGTH, (job.request_id, got.final)
        assert got.final.output_tokens == len(got.token_ids) == MAX_TOKENS, job.request_id
        assert got.token_ids == undisturbed(job), (
            f"{job.request_id} (seed {job.seed}) differs from undisturbed"
        )


def assert_healed(fleet: FaultFleet, timeout_s: float = 60.0) -> None:
    """Both workers healthy with every block free; Redis holds no waiting or running request and
    every request's keys expire (only live keys are left)."""
    wait_workers_healthy(fleet.address, 2, timeout_s)
    deadline = time.monotonic() + timeout_s
    infos: list[admin_pb2.WorkerInfo] = []
    while time.monotonic() < deadline:
        infos = fleet.workers_info()
        if all(
            w.healthy
            and w.gpu.free_blocks == w.gpu.total_blocks > 0
            and w.host.free_blocks == w.host.total_blocks
            and not w.running_request_ids
            and w.reserved_gpu_blocks == 0
            for w in infos
        ):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(
            f"blocks still held: {[(w.worker_id, w.gpu, w.running_request_ids) for w in infos]}"
        )
    r = redis.Redis.from_url(fleet.redis.url, decode_responses=True)
    try:
        assert r.zcard(f"{fleet.prefix}:waiting") == 0
        assert r.scard(f"{fleet.prefix}:running") == 0
        for key in r.scan_iter(f"{fleet.prefix}:req:*"):
            assert r.ttl(key) > 0, f"{key} never expires"
            assert r.hget(key, "status") == '"finished"', key
        for key in r.scan_iter(f"{fleet.prefix}:tokens:*"):
            assert r.ttl(key) > 0, f"{key} never expires"
    finally:
        r.close()


async def run_all(fleet: FaultFleet, todo: list[Job]) -> list[asyncio.Task[Streamed]]:
    return [asyncio.create_task(careful_client(fleet.address, job)) for job in todo]
