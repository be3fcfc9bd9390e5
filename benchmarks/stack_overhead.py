"""Where a one-at-a-time request's time goes: the engine's own steps against the whole stack.

Sends ``--requests`` requests one after the other (each when the previous one finished) through an
embedded system (Redis, scheduler, one worker process; ``benchmarks/vs_vllm_ours.py``) on the
``vs_vllm.py`` model folder, and for each reads, around the request, the worker's own step series
from its metrics page (``layerkv_worker_step_seconds``: what its engine steps took inside the
worker process). Nothing else subscribes to the worker, so the measured system is the one the
clients use. Per request:

* TTFT at the client, the worker's prefill step(s), and their difference: everything that is not
  the prefill (client and scheduler gRPC, admission and its Redis writes, the round, the dispatch,
  the event back, the token commit, the stream to the client);
* TPOT at the client and the worker's mean decode step: their difference is per-token time outside
  the steps (gaps between steps);
* the same prompts' prefill and decode steps through an ``Engine`` in this process (no stack): a
  step inside the worker that costs more than this waits for the CPU or the GIL there;
* the TTFT outside the prefill split by the scheduler's own times (its final message): client to
  scheduler and back (client TTFT less the scheduler's), the scheduler's arrival to dispatch, and
  its dispatch to first token less the prefill steps (the dispatch RPC, the worker's hand-off, the
  step's event back; ``worker_hop.py`` measures the worker's share of it alone).

    python benchmarks/stack_overhead.py --requests 6 --output-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python benchmarks/stack_overhead.py` from anywhere
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from benchmarks.vs_vllm_model import ensure_model_folder  # noqa: E402
from benchmarks.vs_vllm_ours import OurSystemConfig, our_system  # noqa: E402
from benchmarks.vs_vllm_settings import MODEL_SHAPES  # noqa: E402
from layerkv.bench.runner import ClientConfig, run_workload, set_policy, wait_ready  # noqa: E402
from layerkv.bench.workload import BenchRequest  # noqa: E402

_STEP = re.compile(r'^layerkv_worker_step_seconds_(sum|count)\{[^}]*kind="(\w+)"[^}]*\}\s+([0-9.eE+-]+)$',
                   re.MULTILINE)


def step_totals(metrics_text: str) -> dict[str, tuple[float, float]]:
    """kind -> (seconds, steps) of the worker's step histogram in a Prometheus text page."""
    out: dict[str, list[float]] = {}
    for part, kind, value in _STEP.findall(metrics_text):
        out.setdefault(kind, [0.0, 0.0])[0 if part == "sum" else 1] += float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def steps_between(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
                  kind: str) -> tuple[float, int]:
    """Seconds and number of ``kind`` steps between two reads of the step totals."""
    s0, n0 = before.get(kind, (0.0, 0.0))
    s1, n1 = after.get(kind, (0.0, 0.0))
    return s1 - s0, round(n1 - n0)


@dataclass(frozen=True)
class Row:
    """One request through the stack (times in ms)."""

    ttft_ms: float
    prefill_step_ms: float
    outside_prefill_ms: float  # TTFT less the prefill steps
    tpot_ms: float
    decode_step_ms: float
    outside_decode_ms: float  # TPOT less the mean decode step
    client_hop_ms: float  # client TTFT less the scheduler's (arrival to first token on its clock)
    queue_ms: float  # the scheduler's arrival to dispatch (admission, its Redis writes, the round)
    dispatched_ms: float  # the scheduler's dispatch to first token, less the prefill steps


def _prompts(n: int, tokens: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(tokens)] for _ in range(n)]


def engine_only(folder: Path, prompts: list[list[int]], output_tokens: int, block_size: int,
                gpu_blocks: int) -> tuple[list[float], list[float]]:
    """Prefill seconds and mean decode-step seconds of each prompt through an in-process Engine."""
    import torch

    from common.types import SamplingParams
    from worker_svc.engine import Engine, EngineConfig

    torch.set_num_threads(1)
    engine = Engine.from_config(EngineConfig(model=str(folder), device="cpu", dtype="float32",
                                             block_size=block_size, gpu_blocks=gpu_blocks, host_blocks=0))
    prefill, decode = [], []
    for i, prompt in enumerate([prompts[0][:64], *prompts]):  # the first one warms up
        engine.add_request(f"e{i}", prompt, SamplingParams(max_tokens=output_tokens, ignore_eos=True), None)
        p, d = 0.0, []
        while engine.has_work():
            t0 = time.perf_counter()
            kind = engine.step().stats.kind
            dt = time.perf_counter() - t0
            if kind == "decode":
                d.append(dt)
            else:
                p += dt
        if i:
            prefill.append(p)
            decode.append(statistics.mean(d))
    return prefill, decode


def through_stack(folder: Path, prompts: list[list[int]], output_tokens: int, block_size: int,
                  gpu_blocks: int) -> list[Row]:
    cfg = OurSystemConfig(folder, block_size, gpu_blocks, host_blocks=0, staging_blocks=0)
    rows: list[Row] = []
    with our_system(cfg, "vllm") as system:
        config = ClientConfig(system.scheduler_address, 60.0, 10.0, api_token=system.tokens.api,
                              admin_token=system.tokens.admin)
        worker_metrics = system.workers[0][1]

        async def run() -> None:
            await wait_ready(config)
            await set_policy(config, "vllm", {})
            await run_workload(config, [BenchRequest(0, 0.0, tuple(prompts[0][:64]), 8)])  # warm-up
            async with httpx.AsyncClient() as http:
                for i, prompt in enumerate(prompts):
                    await asyncio.sleep(0.3)  # the previous request's last step report is in
                    before = step_totals((await http.get(worker_metrics)).text)
                    (res,) = await run_workload(config, [BenchRequest(i, 0.0, tuple(prompt), output_tokens)])
                    await asyncio.sleep(0.3)
                    after = step_totals((await http.get(worker_metrics)).text)
                    if not res.ok or res.ttft_s is None or res.tpot_s is None:
                        raise RuntimeError(f"request {i} failed: {res.error}")
                    server_ttft, queue = res.server_ttft_s or 0.0, res.queue_s or 0.0
                    prefill_s, _ = steps_between(before, after, "prefill")
                    decode_s, decodes = steps_between(before, after, "decode")
                    step = decode_s / max(1, decodes)
                    rows.append(Row(1e3 * res.ttft_s, 1e3 * prefill_s, 1e3 * (res.ttft_s - prefill_s),
                                    1e3 * res.tpot_s, 1e3 * step, 1e3 * (res.tpot_s - step),
                                    1e3 * (res.ttft_s - server_ttft), 1e3 * queue,
                                    1e3 * (server_ttft - queue - prefill_s)))

        asyncio.run(run())
    return rows


def request_parser(description: str | None) -> argparse.ArgumentParser:
    """The options of a one-request-at-a-time run (shared with ``benchmarks/worker_hop.py``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="small")
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    p = request_parser(__doc__)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    shape = MODEL_SHAPES[args.model_shape]
    folder = ensure_model_folder(REPO / ".bench" / f"model-{args.model_shape}", shape)
    prompts = _prompts(args.requests, args.prompt_tokens, shape.vocab_size, args.seed)
    per_layer = -(-(args.prompt_tokens + args.output_tokens) // args.block_size) * 2
    gpu_blocks = per_layer * shape.num_layers
    prefill, decode = engine_only(folder, prompts, args.output_tokens, args.block_size, gpu_blocks)
    rows = through_stack(folder, prompts, args.output_tokens, args.block_size, gpu_blocks)
    print(f"model {args.model_shape}, prompt {args.prompt_tokens}, output {args.output_tokens}, "
          "one request at a time; ms")
    head = ("request", "engine prefill", "stack TTFT", "worker prefill step", "TTFT outside it",
            "engine decode step", "stack TPOT", "worker decode step", "TPOT outside it")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    values = [[1e3 * pe, r.ttft_ms, r.prefill_step_ms, r.outside_prefill_ms, 1e3 * de, r.tpot_ms,
               r.decode_step_ms, r.outside_decode_ms]
              for r, pe, de in zip(rows, prefill, decode, strict=True)]
    means = [statistics.mean(column) for column in zip(*values, strict=True)]
    for label, v in [*((str(i), v) for i, v in enumerate(values)), ("mean", means)]:
        cells = (f"{x:.1f}" if c < 4 else f"{x:.2f}" for c, x in enumerate(v))  # ms: prefill, then decode
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nTTFT outside the prefill steps, split: ms")
    split_head = ("request", "client to scheduler and back", "scheduler arrival to dispatch",
            "dispatch to first token at the scheduler, less the prefill steps")
    print("| " + " | ".join(split_head) + " |\n|" + "---|" * len(split_head))
    split = [[r.client_hop_ms, r.queue_ms, r.dispatched_ms] for r in rows]
    for label, v in [*((str(i), v) for i, v in enumerate(split)),
                     ("mean", [statistics.mean(c) for c in zip(*split, strict=True)])]:
        print(f"| {label} | " + " | ".join(f"{x:.2f}" for x in v) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "engine_prefill_s": prefill, "engine_decode_step_s": decode,
                                         "stack": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
