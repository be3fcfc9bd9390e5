"""Decisions of the ``vllm`` policy (vLLM v1's admission) on constructed fleet snapshots."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from common.types import CostModel, KVGeometry, Placement
from layerkv.bench_cmd import DEFAULT_POLICIES
from scheduler_svc.policies.base import (
    FleetSnapshot,
    PreemptionMode,
    RunningRequest,
    WaitingRequest,
    WorkerSnapshot,
)
from scheduler_svc.policies.registry import POLICIES, make_policy
from scheduler_svc.policies.vllm import VllmParams, VllmPolicy

# 4 layers, 16-token blocks: a prompt of n tokens takes ceil(n / 16) blocks in each of 4 layers.
GEOMETRY = KVGeometry(num_layers=4, num_kv_heads=1, head_dim=8, block_size=16, dtype_bytes=2)


def worker(
    worker_id: str = "w0",
    *,
    gpu_free: int,
    gpu_total: int = 64,
    held: int = 0,
    preempted: int = 0,
    running: int = 0,
    accepting: bool = True,
    max_model_len: int = 4096,
) -> WorkerSnapshot:
    placement = Placement.all_gpu(GEOMETRY.num_layers)
    return WorkerSnapshot(
        worker_id=worker_id,
        geometry=GEOMETRY,
        gpu_blocks_total=gpu_total,
        host_blocks_total=1000,
        gpu_blocks_free=gpu_free,
        host_blocks_free=1000,
        max_model_len=max_model_len,
        cost_model=CostModel(),
        running=tuple(RunningRequest(f"run{i}", 16, 16, 1, 0.1, None, placement) for i in range(running)),
        accepting=accepting,
        requests_held=held,
        requests_preempted=preempted,
    )


def waiting(*prompts: int, max_tokens: int = 64) -> tuple[WaitingRequest, ...]:
    return tuple(WaitingRequest(f"r{i}", n, max_tokens, float(i), None, None) for i, n in enumerate(prompts))


def ids(policy: VllmPolicy, *workers: WorkerSnapshot, queue: tuple[WaitingRequest, ...]) -> list[str]:
    return [d.request_id for d in policy.schedule(FleetSnapshot(0.0, queue, workers))]


@pytest.mark.parametrize(
    ("prompts", "max_tokens", "gpu_free", "admitted"),
    [
        # prompt-only admission: 16 tokens take 4 blocks whatever max_tokens says
        ((16,), 1000, 4, ["r0"]),
        ((17,), 1000, 4, []),  # 2 blocks per layer: 8 > 4
        ((16, 16, 16), 200, 12, ["r0", "r1", "r2"]),  # fcfs-full would take 3 x 52 blocks for these
        ((16, 16, 16), 200, 11, ["r0", "r1"]),
        # FCFS head-of-line: r1 does not fit now, so r2 (which would) waits behind it
        ((16, 64, 16), 16, 19, ["r0"]),  # 4 + 16 > 19
        ((64, 16), 16, 15, []),
    ],
)
def test_admits_in_order_while_the_prompt_fits(
    prompts: tuple[int, ...], max_tokens: int, gpu_free: int, admitted: list[str]
) -> None:
    queue = waiting(*prompts, max_tokens=max_tokens)
    # An empty worker's 1024 GPU blocks (256 per layer) hold any of these to its last token.
    assert ids(VllmPolicy(), worker(gpu_free=gpu_free, gpu_total=1024), queue=queue) == admitted


@pytest.mark.parametrize(
    ("max_num_seqs", "held", "running", "admitted"),
    [
        (256, 0, 0, ["r0", "r1", "r2"]),
        (2, 0, 0, ["r0", "r1"]),
        (2, 1, 0, ["r0"]),  # one dispatched or preempted request already counts
        (2, 0, 1, ["r0"]),  # so does a running one (when the ledger's count lags)
        (2, 2, 0, []),
    ],
)
def test_max_num_seqs_bounds_the_requests_a_worker_holds(
    max_num_seqs: int, held: int, running: int, admitted: list[str]
) -> None:
    policy = make_policy("vllm", {"max_num_seqs": max_num_seqs})
    assert isinstance(policy, VllmPolicy)
    w = worker(gpu_free=64, held=held, running=running)
    assert ids(policy, w, queue=waiting(16, 16, 16)) == admitted


def test_preempted_requests_on_a_worker_go_before_any_new_dispatch() -> None:
    busy, idle = worker("busy", gpu_free=64, held=1, preempted=1), worker("idle", gpu_free=8)
    got = VllmPolicy().schedule(FleetSnapshot(0.0, waiting(16, 16, 16), (busy, idle)))
    assert [(d.request_id, d.worker_id) for d in got] == [("r0", "idle"), ("r1", "idle")]
    assert ids(VllmPolicy(), busy, queue=waiting(16)) == []


def test_dispatches_are_all_gpu_without_headroom_and_preempt_by_recompute() -> None:
    (d,) = VllmPolicy().schedule(FleetSnapshot(0.0, waiting(40), (worker(gpu_free=64),)))
    assert d.placement == Placement.all_gpu(4)
    assert d.headroom_tokens == 0
    assert d.preemption is PreemptionMode.RECOMPUTE


def test_a_request_no_empty_gpu_tier_holds_is_skipped_not_blocking() -> None:
    # 64 GPU blocks hold 16 blocks per layer (256 tokens): 200 + 100 tokens can never finish there.
    queue = (*waiting(200, max_tokens=100), WaitingRequest("small", 16, 16, 5.0, None, None))
    assert ids(VllmPolicy(), worker(gpu_free=64, gpu_total=64), queue=queue) == ["small"]
    # ... while one that reaches exactly 256 tokens may go, on its prompt's blocks alone
    exact = waiting(200, max_tokens=56)
    assert ids(VllmPolicy(), worker(gpu_free=52, gpu_total=64), queue=exact) == ["r0"]
    too_long = worker(gpu_free=64, max_model_len=100)
    assert ids(VllmPolicy(), too_long, queue=waiting(90, max_tokens=20)) == []


def test_the_worker_with_most_free_gpu_blocks_takes_each_request() -> None:
    a, b = worker("a", gpu_free=12), worker("b", gpu_free=10)
    drained = worker("drained", gpu_free=64, accepting=False)
    got = VllmPolicy().schedule(FleetSnapshot(0.0, waiting(16, 16, 16, 16), (a, b, drained)))
    # each takes 4 blocks from the emptier: a 12 -> 8, b 10 -> 6, a 8 -> 4, b 6 -> 2
    assert [d.worker_id for d in got] == ["a", "b", "a", "b"]
    assert ids(VllmPolicy(), replace(a, gpu_blocks_free=3), queue=waiting(16)) == []


def test_parameters_are_validated_and_the_bench_compares_vllm() -> None:
    with pytest.raises(ValidationError):
        VllmParams.model_validate({"max_num_seqs": 0})
    with pytest.raises(ValidationError):
        VllmParams.model_validate({"watermark": 0.01})
    assert VllmParams().max_num_seqs == 256  # vLLM's default
    assert POLICIES["vllm"] is VllmPolicy
    assert DEFAULT_POLICIES.split(",") == ["vllm", "fcfs-full", "layerkv"]
    assert set(DEFAULT_POLICIES.split(",")) <= set(POLICIES)
