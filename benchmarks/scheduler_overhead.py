"""The scheduler's own overhead, measured in one run with stub workers (no model, no torch).

Processes: a redis-server, one process with the stub workers, the real ``layerkv scheduler``
command, and this client. Two measurements, side by side:

* **added latency per request**: the same request (``--prompt-tokens``, ``--max-tokens``) sent one at
  a time (a) straight to a stub worker (Dispatch + its StreamEvents), (b) through the scheduler
  with a call per request (``Generate``) and (c) through the scheduler on one multiplexed
  ``GenerateStream`` kept open (a front end's way); the difference of the medians (and of the
  99th percentiles) to (a) is what the scheduler adds (admission, Redis writes, the scheduling
  round, the extra gRPC hop and re-streaming). The three sides take turns request by request
  (``--requests`` each, 1,000 by default: ten samples lie above each side's p99), so drift on the
  shared machine falls on all three alike. The direct side uses a stub of its own that the
  scheduler does not watch.
* **dispatches per second**: a burst of ``--burst`` one-token requests, ``--concurrency`` in flight,
  three ways: on one ``GenerateStream`` (the headline: a front end sends the requests that are
  ready in one message, here the refills for the finals of one response), with a ``Generate``
  call per request (``burst_per_call``), and straight to the direct stub the same way as the
  stream (``burst_direct``: the ready requests in one ``DispatchBatch``, finishes read from its
  ``StreamEvents``). Through the scheduler: the rate at which it dispatched them (first arrival to
  last dispatch, from the requests' own timestamps); direct: requests over the time until the
  last ``DispatchBatch`` was answered; and the completed requests per second.
* **scheduler CPU time per request**, in both phases (from ``/proc``): on a machine shared with
  other work wall-clock rates include waiting for a core; 1 / (CPU s per request) is the rate the
  scheduler could sustain on one core of its own. ``--scheduler-cpu N`` pins it to core N and
  keeps every other process of the benchmark off that core. The client's, the stubs' and Redis's
  CPU time per burst request are reported too: when they add up to the other cores, the burst
  rate is theirs, not the scheduler's.

Usage: ``python benchmarks/scheduler_overhead.py [--workers 2 --burst 2000 --json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc.aio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.proto.layerkv.v1 import (  # noqa: E402
    scheduler_pb2,
    scheduler_pb2_grpc,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from layerkv.testing.ports import free_port, wait_tcp  # noqa: E402

# Runs ``python -m layerkv ...`` under cProfile with a CPU-time clock, so time spent waiting (for
# Redis, for the next event) does not count and the stats add up to the process's CPU time.
PROFILED = (
    "import cProfile, runpy, sys, time; sys.argv = sys.argv[2:]; p = cProfile.Profile(time.process_time); "
    "p.enable()\ntry: runpy.run_module('layerkv', run_name='__main__', alter_sys=True)\n"
    "finally: p.disable(); p.dump_stats({!r})"
)


def wait_port(port: int, timeout_s: float = 30.0) -> None:
    if not wait_tcp("127.0.0.1", port, timeout_s):
        raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s")


def request(prompt_tokens: int, max_tokens: int, request_id: str = "") -> scheduler_pb2.GenerateRequest:
    # final_with_tokens: the last tokens ride in the final message (a one-token request streams
    # one message instead of two), as a client that only needs the whole output would ask.
    return scheduler_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=scheduler_pb2.TokenIds(ids=[7] * prompt_tokens),
        sampling=types_pb2.SamplingParams(max_tokens=max_tokens),
        final_with_tokens=True,
    )


class DirectSide:
    """One request at a time straight to a worker: Dispatch, then its StreamEvents until finished."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self.sent = 0

    async def __aenter__(self) -> DirectSide:
        self.events = self.stub.StreamEvents(worker_pb2.StreamEventsRequest())
        self.iterator = self.events.__aiter__()
        await self.iterator.__anext__()  # the initial state: the subscription is live
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.events.cancel()
        await self.channel.close(None)

    async def one(self, prompt_tokens: int, max_tokens: int) -> float:
        rid = f"direct-{self.sent}"
        self.sent += 1
        start = time.perf_counter()
        await self.stub.Dispatch(
            worker_pb2.DispatchRequest(
                request_id=rid,
                prompt_token_ids=[7] * prompt_tokens,
                sampling=types_pb2.SamplingParams(max_tokens=max_tokens),
                placement="GGGG",
            )
        )
        while True:
            event = await self.iterator.__anext__()
            ends = [u for u in event.tokens if u.request_id == rid and u.finished]
            if ends:
                assert ends[0].finish_reason == types_pb2.FINISH_REASON_LENGTH, ends[0]
                return time.perf_counter() - start


async def call_one(
    client: scheduler_pb2_grpc.SchedulerServiceStub, prompt_tokens: int, max_tokens: int
) -> float:
    """One ``Generate`` call, read to its final."""
    start = time.perf_counter()
    async for response in client.Generate(request(prompt_tokens, max_tokens)):
        if response.HasField("final"):
            assert response.final.output_tokens == max_tokens, response.final
    return time.perf_counter() - start


class StreamSide:
    """One request at a time on one open GenerateStream: send it, read until its final."""

    def __init__(self, client: scheduler_pb2_grpc.SchedulerServiceStub) -> None:
        self.call = client.GenerateStream()
        self.tag = 0

    async def one(self, prompt_tokens: int, max_tokens: int) -> float:
        start = time.perf_counter()
        await self.call.write(submit_message([(self.tag, request(prompt_tokens, max_tokens))]))
        self.tag += 1
        while True:
            response = await self.call.read()
            for event in response.events:
                assert not event.HasField("error"), event.error
                if event.HasField("final"):
                    assert event.final.output_tokens == max_tokens, event.final
                    return time.perf_counter() - start

    async def close(self) -> None:
        await self.call.done_writing()
        await self.call.read()  # EOF: every tag ended


def submit_message(
    tagged: list[tuple[int, scheduler_pb2.GenerateRequest]],
) -> scheduler_pb2.GenerateStreamRequest:
    return scheduler_pb2.GenerateStreamRequest(
        requests=[scheduler_pb2.TaggedGenerateRequest(tag=t, request=r) for t, r in tagged]
    )


async def burst(
    client: scheduler_pb2_grpc.SchedulerServiceStub, n: int, concurrency: int, pids: dict[str, int],
    stream: bool,
) -> dict[str, float]:
    """The burst's rates, and the CPU time each process spent on it per request (read as soon
    as the last request completes: the GetRequest calls after it are the benchmark's own)."""
    semaphore = asyncio.Semaphore(concurrency)
    ids: list[str] = []  # the ids the scheduler chose, as a client that sends none (the OpenAI API)

    async def one() -> None:
        async with semaphore:
            async for response in client.Generate(request(8, 1)):
                rid = response.request_id
            ids.append(rid)

    async def multiplexed() -> None:
        # The first window in one message, then per response the refills for its finals in one.
        call = client.GenerateStream()
        sent = min(concurrency, n)
        await call.write(submit_message([(t, request(8, 1)) for t in range(sent)]))
        while len(ids) < n:
            response = await call.read()
            ended = 0
            for event in response.events:
                assert not event.HasField("error"), event.error
                if event.HasField("final"):
                    ids.append(event.request_id)
                    ended += 1
            refill = min(ended, n - sent)
            if refill:
                await call.write(submit_message([(sent + i, request(8, 1)) for i in range(refill)]))
                sent += refill
        await call.done_writing()
        await call.read()

    before = {name: cpu_s(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    if stream:
        await multiplexed()
    else:
        await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.perf_counter() - start
    spent = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    others = {f"{name}_cpu_ms_per_request": 1000 * s / n for name, s in spent.items() if name != "scheduler"}
    infos = [
        (await client.GetRequest(scheduler_pb2.GetRequestRequest(request_id=rid))).request for rid in ids
    ]
    first_arrival = min(i.arrival_time for i in infos)
    last_dispatch = max(i.dispatch_time for i in infos)
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_s": elapsed,
        "dispatches_per_s": n / (last_dispatch - first_arrival),
        "completed_per_s": n / elapsed,
        "mean_queue_ms": 1000 * statistics.fmean(i.dispatch_time - i.arrival_time for i in infos),
        # CPU time the scheduler process spent, per request: on a machine shared with other work
        # the wall-clock figures include waiting for a core, these do not (1 / CPU s per request
        # is the rate one core of its own could sustain). The others say what else was busy.
        "scheduler_cpu_ms_per_request": 1000 * spent["scheduler"] / n,
        "dispatches_per_scheduler_cpu_s": n / spent["scheduler"] if spent["scheduler"] else float("inf"),
        **others,
    }


async def direct_burst(address: str, n: int, concurrency: int, pids: dict[str, int]) -> dict[str, float]:
    """The stream burst's twin straight to a stub: the ready requests in one DispatchBatch (the
    first window, then the refills for the finishes of one event), finishes from StreamEvents."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        events = stub.StreamEvents(worker_pb2.StreamEventsRequest())
        iterator = events.__aiter__()
        await iterator.__anext__()  # the initial state: the subscription is live

        def batch(first: int, count: int) -> worker_pb2.DispatchBatchRequest:
            return worker_pb2.DispatchBatchRequest(requests=[
                worker_pb2.DispatchRequest(
                    request_id=f"burst-{i}", prompt_token_ids=[7] * 8,
                    sampling=types_pb2.SamplingParams(max_tokens=1), placement="GGGG",
                ) for i in range(first, first + count)
            ])  # fmt: skip

        before = {name: cpu_s(pid) for name, pid in pids.items()}
        start = time.perf_counter()
        sent = min(concurrency, n)
        last_dispatch = start
        calls = [asyncio.ensure_future(stub.DispatchBatch(batch(0, sent)))]
        done = 0
        while done < n:
            event = await iterator.__anext__()
            ended = sum(1 for u in event.tokens if u.finished and u.request_id.startswith("burst-"))
            done += ended
            refill = min(ended, n - sent)
            if refill:
                calls.append(asyncio.ensure_future(stub.DispatchBatch(batch(sent, refill))))
                sent += refill
            while calls and calls[0].done():
                calls.pop(0).result()
                last_dispatch = time.perf_counter()
        for call in calls:
            await call
            last_dispatch = time.perf_counter()
        elapsed = time.perf_counter() - start
        spent = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
        events.cancel()
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_s": elapsed,
        "dispatches_per_s": n / (last_dispatch - start),
        "completed_per_s": n / elapsed,
        **{f"{name}_cpu_ms_per_request": 1000 * s / n for name, s in spent.items() if name != "scheduler"},
    }


def cpu_s(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = int(0.99 * (len(ordered) - 1))
    return {
        "samples": len(ordered),
        "samples_above_p99": len(ordered) - 1 - p99,
        "p50_ms": 1000 * statistics.median(ordered),
        "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
        "p99_ms": 1000 * ordered[p99],
        "mean_ms": 1000 * statistics.fmean(ordered),
    }


async def measure(
    args: argparse.Namespace, scheduler: str, direct_worker: str, pids: dict[str, int]
) -> dict[str, object]:
    scheduler_pid = pids["scheduler"]
    async with grpc.aio.insecure_channel(scheduler) as channel:
        client = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        for _ in range(200):  # wait until the scheduler sees a worker
            try:
                await call_one(client, 4, 1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        shape = (args.prompt_tokens, args.max_tokens)
        # The three sides request by request in turn (the order rotating), so drift (a busy core,
        # a GC pass, another job) falls on all of them alike; --requests of each, after a warm-up.
        # The scheduler's CPU is read around each request, the direct side's too (what it spends
        # with no request of its own).
        direct: list[float] = []
        via: list[float] = []
        streamed: list[float] = []
        cpu = {"direct": 0.0, "via": 0.0, "stream": 0.0}
        async with DirectSide(direct_worker) as direct_side:
            stream_side = StreamSide(client)
            sides = [
                ("direct", direct_side.one),
                ("via", lambda *shape: call_one(client, *shape)),
                ("stream", stream_side.one),
            ]
            samples = {"direct": direct, "via": via, "stream": streamed}
            for i in range(args.warmup + args.requests):
                for name, one in sides[i % 3 :] + sides[: i % 3]:
                    before = cpu_s(scheduler_pid)
                    elapsed = await one(*shape)
                    if i >= args.warmup:
                        samples[name].append(elapsed)
                        cpu[name] += cpu_s(scheduler_pid) - before
            await stream_side.close()
        via_cpu, stream_cpu = cpu["via"], cpu["stream"]
        throughput = {}
        if args.burst_client in ("stream", "both"):
            throughput["burst"] = await burst(client, args.burst, args.concurrency, pids, stream=True)
        if args.burst_client in ("call", "both"):
            key = "burst_per_call" if throughput else "burst"
            throughput[key] = await burst(client, args.burst, args.concurrency, pids, stream=False)
        throughput["burst_direct"] = await direct_burst(direct_worker, args.burst, args.concurrency, pids)
    d, v, st = ms(direct), ms(via), ms(streamed)
    return {
        "direct_worker": d,
        "through_scheduler": v,
        "through_stream": st,
        "added_latency_p50_ms": v["p50_ms"] - d["p50_ms"],
        "added_latency_mean_ms": v["mean_ms"] - d["mean_ms"],
        "added_latency_p99_ms": v["p99_ms"] - d["p99_ms"],
        "stream_added_latency_p50_ms": st["p50_ms"] - d["p50_ms"],
        "stream_added_latency_mean_ms": st["mean_ms"] - d["mean_ms"],
        "stream_added_latency_p99_ms": st["p99_ms"] - d["p99_ms"],
        "scheduler_cpu_ms_per_sequential_request": 1000 * via_cpu / len(via),
        "scheduler_cpu_ms_per_sequential_stream_request": 1000 * stream_cpu / len(streamed),
        # What the scheduler spends meanwhile with no request of its own (its idle rounds, the
        # workers' event streams): the floor under the two figures above.
        "scheduler_cpu_ms_per_direct_request": 1000 * cpu["direct"] / len(direct),
        **throughput,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-s", type=float, default=0.001, help="stub worker step time")
    parser.add_argument(
        "--requests", type=int, default=1000,
        help="sequential requests per latency side (1,000: ten samples above the p99)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=20, help="sequential requests per side not counted")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument(
        "--burst-client", choices=("stream", "call", "both"), default="both",
        help="the burst on one GenerateStream (reported as 'burst'), a Generate call per request, or both",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument(
        "--scheduler-cpu", type=int, default=None,
        help="pin the scheduler process to this CPU (one core of its own, as the target is stated)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=Path, default=None,
        help="run the scheduler under cProfile and write its stats here (read with pstats)",
    )  # fmt: skip
    args = parser.parse_args()

    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("needs redis-server on PATH")
    procs: list[subprocess.Popen[bytes]] = []
    cpu = args.scheduler_cpu
    # With the scheduler on a core of its own, everything else (Redis, the stubs, this client)
    # keeps off that core: the target is stated for one core that the scheduler does not share.
    others = None if cpu is None else (os.sched_getaffinity(0) - {cpu}) or None
    if others is not None:
        os.sched_setaffinity(0, others)  # inherited by Redis and the stubs
    with tempfile.TemporaryDirectory() as tmp:
        try:
            redis_port = free_port()
            procs.append(subprocess.Popen(
                [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL,
            ))  # fmt: skip
            wait_port(redis_port)
            # One more stub than the scheduler gets: the direct side's. A stub the scheduler also
            # watched would see its requests aborted there as attempts that are not the scheduler's.
            worker_ports = [free_port() for _ in range(args.workers + 1)]
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "scheduler_svc.testing.stub_worker", "--ports",
                 ",".join(map(str, worker_ports)), "--step-s", str(args.step_s)], cwd=REPO,
                stdout=subprocess.DEVNULL,
            ))  # fmt: skip
            for port in worker_ports:
                wait_port(port)
            direct_worker, *workers = [f"127.0.0.1:{p}" for p in worker_ports]
            sched_port = free_port()
            env = {**os.environ, "LAYERKV_LOG_LEVEL": "WARNING"}
            procs.append(subprocess.Popen(
                [sys.executable, *(["-c", PROFILED.format(str(args.profile))] if args.profile else []),
                 "-m", "layerkv", "scheduler", "--host", "127.0.0.1",
                 "--port", str(sched_port), "--metrics-port", "0", "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
                 "--workers", ",".join(workers), "--policy", "fcfs-full", "--queue-limit", "100000"],
                cwd=REPO, env=env, stderr=subprocess.DEVNULL,
                preexec_fn=None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu})),
            ))  # fmt: skip
            wait_port(sched_port)
            import uvloop

            redis, stubs, scheduler = procs
            pids = {"scheduler": scheduler.pid, "client": os.getpid(), "stubs": stubs.pid, "redis": redis.pid}
            results = uvloop.run(measure(args, f"127.0.0.1:{sched_port}", direct_worker, pids))
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(timeout=10)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": " ".join(["python", "benchmarks/scheduler_overhead.py", *sys.argv[1:]]),
        "settings": vars(args) | {"json": str(args.json or ""), "profile": str(args.profile or "")},
        **results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
