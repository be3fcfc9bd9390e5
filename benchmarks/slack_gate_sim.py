"""The real policies on a simulated worker: what the TPOT-slack gate does where TPOT binds.

A step-by-step model of one worker (no processes, no torch, deterministic per seed): every step
decodes one token for each running request and prefills the next prompt chunk of the requests
admitted (chunked, ``--budget`` tokens per step, as the engine does), and takes the time a known
``CostModel`` gives it (times a uniform jitter, plus ``--overhead`` seconds per step that the
step reports miss: the engine's time between steps). The policies under test (``vllm``,
``layerkv`` with ``slack_gate`` off, ``layerkv``) see the same ``FleetSnapshot`` a scheduler builds
(running requests with their ``T_past`` and first-token time, prefills in flight, free blocks)
before every step and their dispatches start prefilling in the next one. TPOT and TTFT are
measured as a client would (first token to finish, arrival to first token). The TPOT SLO is
``--tpot-x`` times the batch-1 step: the TPOT-bound setting of issue 10.

This isolates the policy's logic from a noisy host; ``layerkv bench`` measures the real system.

Usage: ``python benchmarks/slack_gate_sim.py --rates 2,4,6 [--variant queue_order=\\"fcfs\\"]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common import kv_budget
from common.types import CostModel, KVGeometry, Placement
from scheduler_svc.policies.base import (
    FleetSnapshot,
    PrefillInFlight,
    RunningRequest,
    WaitingRequest,
    WorkerSnapshot,
)
from scheduler_svc.policies.registry import make_policy

# tiny-llama-like geometry; a GPU link of 2 GB/s each way.
GEOMETRY = KVGeometry(num_layers=4, num_kv_heads=4, head_dim=64, block_size=16, dtype_bytes=4)
COST = CostModel(
    prefill_per_token_s=1e-4,
    decode_base_s=0.005,
    decode_per_request_s=0.0006,
    d2h_bytes_per_s=2e9,
    h2d_bytes_per_s=2e9,
)


@dataclass
class SimRequest:
    request_id: str
    prompt: int
    output: int
    arrival: float
    placement: Placement | None = None
    dispatch: float = 0.0
    prefilled: int = 0
    generated: int = 0
    first: float = 0.0
    finish: float = 0.0
    decode_time: float = 0.0  # the worker's T_past: its step times since the first token

    def held_tokens(self) -> int:
        return self.prompt + self.generated


@dataclass(frozen=True)
class SimConfig:
    rate: float
    requests: int
    seed: int
    gpu_blocks: int
    budget: int
    overhead_s: float
    ttft_slo_s: float
    tpot_slo_s: float
    prompt: int
    output: tuple[int, int]


def _snapshot(
    now: float, waiting: list[SimRequest], active: list[SimRequest], cfg: SimConfig
) -> FleetSnapshot:
    def demand(r: SimRequest) -> kv_budget.BlockDemand:
        assert r.placement is not None
        return kv_budget.demand(GEOMETRY, r.held_tokens() + GEOMETRY.block_size, r.placement)

    gpu_used = sum(demand(r).gpu_blocks for r in active)
    host_used = sum(demand(r).host_blocks for r in active)
    host_total = 1 << 20
    running = tuple(
        RunningRequest(
            r.request_id,
            r.prompt,
            r.output,
            r.generated,
            r.decode_time,
            cfg.tpot_slo_s,
            r.placement,
            None,
            r.first,
        )
        for r in active
        if r.generated and r.placement is not None
    )
    prefilling = tuple(
        PrefillInFlight(r.request_id, r.prompt, r.output, r.placement, cfg.tpot_slo_s, r.dispatch)
        for r in active
        if not r.generated and r.placement is not None
    )
    worker = WorkerSnapshot(
        worker_id="w0",
        geometry=GEOMETRY,
        gpu_blocks_total=cfg.gpu_blocks,
        host_blocks_total=host_total,
        gpu_blocks_free=cfg.gpu_blocks - gpu_used,
        host_blocks_free=host_total - host_used,
        max_model_len=1 << 14,
        cost_model=COST,
        running=running,
        accepting=True,
        max_num_batched_tokens=cfg.budget,
        prefilling=prefilling,
    )
    queue = tuple(
        WaitingRequest(r.request_id, r.prompt, r.output, r.arrival, cfg.ttft_slo_s, cfg.tpot_slo_s)
        for r in waiting
    )
    return FleetSnapshot(now, queue, (worker,))


def _step_s(
    active: list[SimRequest], cfg: SimConfig, rng: random.Random
) -> tuple[float, list[tuple[SimRequest, int]]]:
    decodes = [r for r in active if r.generated]
    budget = cfg.budget - len(decodes)
    chunks: list[tuple[SimRequest, int]] = []
    for r in active:
        if not r.generated and budget > 0:
            n = min(r.prompt - r.prefilled, budget)
            chunks.append((r, n))
            budget -= n
    context = sum(r.held_tokens() for r in decodes)
    h2d = sum(
        r.placement.host_layers * GEOMETRY.bytes_per_layer(r.held_tokens()) for r in decodes if r.placement
    )
    step = COST.decode_step_s(len(decodes), context, h2d) if decodes else 0.0
    for r, n in chunks:
        assert r.placement is not None
        step += COST.prefill_s(r.prefilled + n) - COST.prefill_s(r.prefilled)
        step = max(step, r.placement.host_layers * GEOMETRY.bytes_per_layer(n) / COST.d2h_bytes_per_s)
    return max(step, 1e-4) * rng.uniform(0.9, 1.1), chunks


def simulate(policy_name: str, params: dict[str, Any], cfg: SimConfig) -> list[SimRequest]:
    rng = random.Random(cfg.seed)
    clock = 0.0
    arrivals = []
    for i in range(cfg.requests):
        clock += rng.expovariate(cfg.rate)
        arrivals.append(SimRequest(f"q{i}", cfg.prompt, rng.randint(*cfg.output), clock))
    policy = make_policy(policy_name, params)
    now, nxt = 0.0, 0
    waiting: list[SimRequest] = []
    active: list[SimRequest] = []
    done: list[SimRequest] = []
    while len(done) < cfg.requests:
        while nxt < cfg.requests and arrivals[nxt].arrival <= now:
            waiting.append(arrivals[nxt])
            nxt += 1
        by_id = {r.request_id: r for r in waiting}
        for d in policy.schedule(_snapshot(now, waiting, active, cfg)):
            r = by_id[d.request_id]
            waiting.remove(r)
            r.placement, r.dispatch = d.placement, now
            active.append(r)
        if not active:  # idle until the next arrival
            now = max(now + 1e-3, arrivals[nxt].arrival if nxt < cfg.requests else now)
            continue
        step, chunks = _step_s(active, cfg, rng)
        now += step + cfg.overhead_s
        for r in active:
            if r.generated:
                r.decode_time += step
                r.generated += 1
        for r, n in chunks:
            r.prefilled += n
            if r.prefilled >= r.prompt:
                r.generated, r.first = 1, now
        for r in [r for r in active if r.generated >= r.output]:
            r.finish = now
            active.remove(r)
            done.append(r)
    return done


def violations(done: Sequence[SimRequest], cfg: SimConfig) -> tuple[float, float, float]:
    """Shares of requests missing their TTFT, their TPOT, either."""
    ttft = [r.first - r.arrival > cfg.ttft_slo_s for r in done]
    tpot = [r.output > 1 and (r.finish - r.first) / (r.output - 1) > cfg.tpot_slo_s for r in done]
    n = len(done)
    return sum(ttft) / n, sum(tpot) / n, sum(a or b for a, b in zip(ttft, tpot, strict=True)) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="2,4,6", help="arrivals per second, comma-separated")
    ap.add_argument("--requests", type=int, default=100, help="requests per run")
    ap.add_argument("--seeds", type=int, default=3, help="runs per point (seeds 0..N-1), averaged")
    ap.add_argument("--gpu-blocks", type=int, default=512, help="GPU-tier blocks (the host tier is large)")
    ap.add_argument("--budget", type=int, default=2048, help="tokens per step (chunked prefill)")
    ap.add_argument("--overhead", type=float, default=0.001, help="seconds per step the step reports miss")
    ap.add_argument("--tpot-x", type=float, default=1.5, help="TPOT SLO as a multiple of the batch-1 step")
    ap.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT SLO, seconds")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--output", default="32:128", help="output tokens MIN:MAX (uniform)")
    ap.add_argument(
        "--variant", action="append", default=[], help="an extra layerkv run with KEY=JSON (repeatable)"
    )
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args()
    lo, _, hi = args.output.partition(":")
    batch1 = COST.decode_step_s(1, args.prompt + int(lo)) + args.overhead
    print(
        f"batch-1 step {batch1 * 1e3:.2f} ms, TPOT SLO {args.tpot_x * batch1 * 1e3:.2f} ms, "
        f"TTFT SLO {args.ttft_slo} s"
    )
    variants: list[tuple[str, str, dict[str, Any]]] = [
        ("vllm", "vllm", {}),
        ("layerkv-nogate", "layerkv", {"slack_gate": False}),
        ("layerkv", "layerkv", {}),
    ]
    for spec in args.variant:
        key, _, value = spec.partition("=")
        variants.append((f"layerkv {spec}", "layerkv", {key: json.loads(value)}))
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        for label, name, params in variants:
            runs = []
            for seed in range(args.seeds):
                cfg = SimConfig(
                    rate, args.requests, seed, args.gpu_blocks, args.budget, args.overhead,
                    args.ttft_slo, args.tpot_x * batch1, args.prompt, (int(lo), int(hi or lo)),
                )  # fmt: skip
                runs.append(violations(simulate(name, params, cfg), cfg))
            ttft, tpot, either = (statistics.mean(r[i] for r in runs) for i in range(3))
            rows.append({"rate": rate, "policy": label, "ttft": ttft, "tpot": tpot, "either": either})
            print(f"rate {rate:5.1f}  {label:34} TTFT {ttft:6.1%}  TPOT {tpot:6.1%}  either {either:6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch1_step_s": batch1, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
