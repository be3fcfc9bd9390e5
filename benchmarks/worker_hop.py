"""What the worker's gRPC face adds to one request: a worker process driven directly, no scheduler.

Starts one ``layerkv worker`` process (the ``stack_overhead.py`` model folder and sizes, one torch
thread), subscribes to its ``StreamEvents`` as the scheduler does, and sends ``--requests``
requests one after the other with ``Dispatch``. Per request, at the client:

* ``dispatch``: the ``Dispatch`` round trip (validation, the admit command on the engine thread);
* ``first event``: from sending the dispatch to the event carrying the first token, less the
  prefill step(s) the worker reports in its step events: the hand-off to the engine thread, the
  step's event built and sent, read here;
* ``per-token gap``: mean time between two decode events less the mean decode step: what a token
  costs outside the step (event building, the stream, the engine thread's turn).

With ``stack_overhead.py``'s "TTFT outside it" (the whole stack) the difference is the client,
the scheduler's hop and its Redis writes.

    python benchmarks/worker_hop.py --requests 6 --output-tokens 64
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from benchmarks.stack_overhead import engine_only, request_parser  # noqa: E402
from benchmarks.vs_vllm_model import ensure_model_folder  # noqa: E402
from benchmarks.vs_vllm_settings import MODEL_SHAPES  # noqa: E402
from common.proto.layerkv.v1 import types_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Row = tuple[float, float, float, float]


async def _drive(address: str, prompts: list[list[int]], output_tokens: int,
                 cpu: list[dict[str, float]], pid: int) -> list[Row]:
    rows: list[Row] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for _ in range(600):  # the worker loads its model
            try:
                await stub.Describe(worker_pb2.DescribeRequest(), timeout=1.0)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        events = stub.StreamEvents(worker_pb2.StreamEventsRequest())
        await events.read()  # the current state: subscribed
        for i, prompt in enumerate([prompts[0][:64], *prompts]):  # the first one warms up
            if i == 1:
                cpu.append(thread_cpu_s(pid))
            rid = f"hop-{i}"
            sampling = types_pb2.SamplingParams(max_tokens=output_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            await stub.Dispatch(worker_pb2.DispatchRequest(request_id=rid, prompt_token_ids=prompt,
                                                           sampling=sampling), timeout=30.0)
            dispatch = time.perf_counter() - t0
            first: float | None = None
            prefill_steps = 0.0
            decode_steps: list[float] = []
            arrivals: list[float] = []
            done = False
            while not done:
                msg = await events.read()
                now = time.perf_counter()
                ours = [t for t in msg.tokens if t.request_id == rid]
                kind = msg.step.kind
                if kind == "prefill" or (kind == "mixed" and first is None):
                    prefill_steps += msg.step.duration_s
                elif kind == "decode":
                    decode_steps.append(msg.step.duration_s)
                for t in ours:
                    if t.token_ids:
                        if first is None:
                            first = now - t0
                        arrivals.append(now)
                    done = done or t.finished
            assert first is not None
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            if i:
                rows.append((1e3 * dispatch, 1e3 * (first - prefill_steps),
                             1e3 * (statistics.mean(gaps) - statistics.mean(decode_steps)),
                             1e3 * statistics.mean(decode_steps)))
            await asyncio.sleep(0.3)
        cpu.append(thread_cpu_s(pid))
        events.cancel()
    return rows


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) each thread of process ``pid`` has used: "main" (the event
    loop's), else "NAME/TID"."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            key = "main" if task.name == str(pid) else f"{name}/{task.name}"
            out[key] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main(argv: list[str] | None = None) -> int:
    args = request_parser(__doc__).parse_args(argv)
    shape = MODEL_SHAPES[args.model_shape]
    folder = ensure_model_folder(REPO / ".bench" / f"model-{args.model_shape}", shape)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1, shape.vocab_size) for _ in range(args.prompt_tokens)]
               for _ in range(args.requests)]
    per_layer = -(-(args.prompt_tokens + args.output_tokens) // args.block_size) * 2
    gpu_blocks = per_layer * shape.num_layers
    # the same prompts through an Engine in this process (no service around it), first
    _, engine_decode = engine_only(folder, prompts, args.output_tokens, args.block_size, gpu_blocks)
    port = _free_port()
    argv_ = [sys.executable, "-m", "layerkv", "worker", "--host", "127.0.0.1", "--port", str(port),
             "--model", str(folder), "--device", "cpu", "--dtype", "float32", "--block-size",
             str(args.block_size), "--gpu-blocks", str(gpu_blocks), "--host-blocks", "0",
             "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERKV_STAGING_BLOCKS": "0"}
    worker = subprocess.Popen(argv_, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cpu: list[dict[str, float]] = []
        rows = asyncio.run(_drive(f"127.0.0.1:{port}", prompts, args.output_tokens, cpu, worker.pid))
    finally:
        worker.terminate()
        worker.wait(30)
    print(f"model {args.model_shape}, prompt {args.prompt_tokens}, output {args.output_tokens}, "
          "worker alone, one request at a time; ms")
    print("| request | dispatch round trip | first event less prefill steps | per-token gap less decode step "
          "| worker decode step | engine decode step (in-process) |")
    print("|---|---|---|---|---|---|")
    table = [(*r, 1e3 * e) for r, e in zip(rows, engine_decode, strict=True)]
    for label, r in [*((str(i), r) for i, r in enumerate(table)),
                     ("mean", tuple(statistics.mean(c) for c in zip(*table, strict=True)))]:
        print(f"| {label} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.2f} |")
    before, after = cpu
    per_request = {k: 1e3 * (after[k] - before.get(k, 0.0)) / len(rows) for k in after}
    print("worker CPU per request by thread, ms: " + ", ".join(
        f"{k} {v:.0f}" for k, v in sorted(per_request.items(), key=lambda kv: -kv[1]) if v > 0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
