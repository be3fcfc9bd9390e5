"""Our side of the comparison: an embedded fleet of one worker per policy, driven over gRPC.

Each policy gets a fresh embedded system (``layerkv.embedded``: its own Redis, scheduler and one
worker process) on the shared model folder, with the GPU tier converted from vLLM's blocks, and is
driven by ``layerkv.bench.runner`` exactly as ``layerkv bench`` does. Preemptions are the growth
of the scheduler's ``vllm:num_preemptions`` counter over the measured run (read from its metrics
page, as real vLLM's is), which it counts from the worker's step reports. Not a second
``StreamEvents`` subscriber: that made the worker build and send every step's event twice and
the load generator decode each one, on the cores the measured system runs on. A worker that does
not name a preemption mode in ``Describe`` never preempts and reports ``None`` ("n/a").
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

from benchmarks.vs_vllm_real import read_preemptions
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


async def preemption_mode(address: str, token: str) -> str:
    """The worker's ``--preemption-mode`` from ``Describe`` (empty: it has no preemption)."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await worker_pb2_grpc.WorkerServiceStub(channel).Describe(
            worker_pb2.DescribeRequest(), timeout=10.0, metadata=bearer_metadata(token))
    return str(reply.preemption_mode)


def preemptions_between(before: float | None, after: float | None) -> int:
    """Preemptions counted between two reads of the scheduler's counter (absent: none yet)."""
    return round((after or 0.0) - (before or 0.0))


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
        mode = ""
        counted = 0
        metrics_base = system.scheduler_metrics.removesuffix("/metrics")  # read_preemptions adds it

        async def run() -> list[RequestResult]:
            nonlocal mode, counted
            await wait_ready(config)
            await set_policy(config, policy, params)
            mode = await preemption_mode(system.workers[0][0], system.tokens.worker)
            for req in warmup:
                await run_workload(config, [req])
            await asyncio.sleep(0.5)  # the warm-up's last step reports trail its last token
            before = read_preemptions(metrics_base)
            try:
                if sequential:
                    return await one_at_a_time(lambda rs: run_workload(config, rs, on_done=on_done), requests)
                return await run_workload(config, requests, on_done=on_done)
            finally:
                await asyncio.sleep(0.5)  # the last step reports trail the last token
                counted = preemptions_between(before, read_preemptions(metrics_base))

        results = asyncio.run(run())
    return OurRun(results, counted if mode else None, mode)
