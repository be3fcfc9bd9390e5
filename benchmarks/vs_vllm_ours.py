"""Our side of the comparison: an embedded fleet of one worker per policy, driven over gRPC.

Each policy gets a fresh embedded system (``layerkv.embedded``: its own Redis, scheduler and one
worker process) on the shared model folder, with the GPU tier converted from vLLM's blocks, and is
driven by ``layerkv.bench.runner`` exactly as ``layerkv bench`` does. Preemptions are summed from
the worker's own step reports (a second ``StreamEvents`` subscriber); a worker that does not name
a preemption mode in ``Describe`` never preempts and reports ``None`` ("n/a").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from common.proto.layerkv.v1 import worker_pb2, worker_pb2_grpc
from common.security import bearer_metadata
from layerkv.bench.report import RequestResult
from layerkv.bench.runner import ClientConfig, run_workload, set_policy, wait_ready
from layerkv.bench.workload import BenchRequest
from layerkv.embedded import EmbeddedOptions, EmbeddedSystem, forget_credentials, start


@dataclass(frozen=True)
class OurSystemConfig:
    """The embedded system one policy runs on."""

    model_folder: Path
    block_size: int
    gpu_blocks: int
    host_blocks: int
    staging_blocks: int
    host_access: str = "auto"  # the worker's --host-access
    torch_threads: int = 1
    startup_timeout_s: float = 300.0


@dataclass(frozen=True)
class OurRun:
    """One policy's measured run."""

    results: list[RequestResult]
    preemptions: int | None  # None: the worker has no preemption (reports none)
    preemption_mode: str


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Environment the embedded children inherit (restored afterwards)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def our_system(cfg: OurSystemConfig, policy: str) -> Iterator[EmbeddedSystem]:
    run_dir = Path(tempfile.mkdtemp(prefix="vs-vllm-ours-"))
    system = EmbeddedSystem(run_dir)
    opts = EmbeddedOptions(workers=1, model=str(cfg.model_folder), device="cpu", dtype="float32",
                           block_size=cfg.block_size, gpu_blocks=cfg.gpu_blocks, host_blocks=cfg.host_blocks,
                           port=0, metrics_port=0, policy=policy, startup_timeout_s=cfg.startup_timeout_s)
    print(f"[ours] starting an embedded system for {policy} (1 worker, {cfg.gpu_blocks} GPU-tier + "
          f"{cfg.staging_blocks} staging + {cfg.host_blocks} host blocks, host access {cfg.host_access}, "
          f"torch threads "
          f"{cfg.torch_threads}); logs {run_dir}", flush=True)
    ok = False
    try:
        with _env({"LAYERKV_STAGING_BLOCKS": str(cfg.staging_blocks), "LAYERKV_HOST_ACCESS": cfg.host_access,
                   "OMP_NUM_THREADS": str(cfg.torch_threads)}):
            start(opts, system)
        yield system
        ok = True
    finally:
        forget_credentials(system)
        system.stop()
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"[ours] logs kept in {run_dir}", flush=True)


class _PreemptionCounter:
    """Sums ``StepReport.num_preemptions`` from a worker's event stream while a run lasts."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self.metadata = bearer_metadata(token)  # the worker answers only its scheduler's token
        self.total = 0
        self.mode = ""

    async def describe(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            reply = await worker_pb2_grpc.WorkerServiceStub(channel).Describe(
                worker_pb2.DescribeRequest(), timeout=10.0, metadata=self.metadata)
        self.mode = str(reply.preemption_mode)

    async def follow(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            events = worker_pb2_grpc.WorkerServiceStub(channel).StreamEvents(worker_pb2.StreamEventsRequest(),
                                                                              metadata=self.metadata)
            async for event in events:
                if event.HasField("step"):
                    self.total += int(event.step.num_preemptions)


Send = Callable[[list[BenchRequest]], Awaitable[list[RequestResult]]]


async def one_at_a_time(send: Send, requests: Sequence[BenchRequest]) -> list[RequestResult]:
    """Each request sent as soon as the previous one has finished, by ``send`` (either side's open-loop
    client), with every result's times moved onto one timeline from the first send (so that the
    run's duration, and its tokens per second, are those of the whole sequence)."""
    start, out = time.monotonic(), []
    for req in requests:
        offset = time.monotonic() - start
        for r in await send([replace(req, arrival_s=0.0)]):
            out.append(replace(
                r, sent_s=r.sent_s + offset,
                first_token_s=None if r.first_token_s is None else r.first_token_s + offset,
                finished_s=None if r.finished_s is None else r.finished_s + offset))
    return out


def run_ours(
    cfg: OurSystemConfig,
    policy: str,
    params: dict[str, object],
    requests: Sequence[BenchRequest],
    client: Callable[[str], ClientConfig],
    warmup: Sequence[BenchRequest],
    on_done: Callable[[RequestResult], None] | None = None,
    sequential: bool = False,
) -> OurRun:
    """Run ``requests`` on a fresh system with ``policy``; the warm-up requests go first, one at a time.
    ``sequential``: each request is sent when the previous one has finished."""
    with our_system(cfg, policy) as system:
        # the embedded system generated its own tokens (secure by default): the client uses them
        config = replace(client(system.scheduler_address), api_token=system.tokens.api,
                                     admin_token=system.tokens.admin)
        counter = _PreemptionCounter(system.workers[0][0], system.tokens.worker)

        async def run() -> list[RequestResult]:
            await wait_ready(config)
            await set_policy(config, policy, params)
            await counter.describe()
            for req in warmup:
                await run_workload(config, [req])
            follower = asyncio.create_task(counter.follow())
            try:
                if sequential:
                    return await one_at_a_time(lambda rs: run_workload(config, rs, on_done=on_done), requests)
                return await run_workload(config, requests, on_done=on_done)
            finally:
                await asyncio.sleep(0.5)  # the last step reports trail the last token
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await follower

        results = asyncio.run(run())
    return OurRun(results, counter.total if counter.mode else None, counter.mode)
