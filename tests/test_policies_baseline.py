"""The baseline policies, the registry and the budget ledger, driven by snapshots built in the test."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgument, NotFound
from common.placement import interleaved
from common.types import CostModel, KVGeometry, Placement
from scheduler_svc.policies.base import FleetSnapshot, WaitingRequest, WorkerSnapshot
from scheduler_svc.policies.fcfs_full import FcfsFullPolicy
from scheduler_svc.policies.least_loaded import LeastLoadedPolicy
from scheduler_svc.policies.registry import POLICIES, describe_policies, make_policy, policy_params

GEOMETRY = KVGeometry(num_layers=8, num_kv_heads=2, head_dim=16, block_size=16, dtype_bytes=2)


def make_worker(
    worker_id: str, gpu_free: int, host_free: int = 0, gpu_total: int = 1024, accepting: bool = True
) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id, GEOMETRY, gpu_total, 1024, gpu_free, host_free, 8192, CostModel(), (), accepting
    )


def make_waiting(*sizes: int, max_tokens: int = 16) -> tuple[WaitingRequest, ...]:
    return tuple(WaitingRequest(f"r{i}", n, max_tokens, float(i), None, None) for i, n in enumerate(sizes))


def blocks(tokens: int, layers: int = 8) -> int:
    return GEOMETRY.blocks_for(tokens) * layers


def test_fcfs_full_dispatches_in_order_while_whole_requests_fit() -> None:
    # r0 needs 2 blocks/layer (16 blocks), r1 3 blocks/layer (24), r2 2 blocks/layer.
    fleet = FleetSnapshot(0.0, make_waiting(16, 32, 16), (make_worker("w0", gpu_free=40),))
    out = FcfsFullPolicy().schedule(fleet)
    assert [d.request_id for d in out] == ["r0", "r1"]  # 16 + 24 = 40; r2 no longer fits
    assert all(d.placement == Placement.all_gpu(8) for d in out)


def test_fcfs_full_blocks_the_head_of_the_line() -> None:
    # r0 does not fit now (but would on an empty worker); r1 would fit but must not overtake it.
    fleet = FleetSnapshot(0.0, make_waiting(512, 16), (make_worker("w0", gpu_free=100, host_free=1000),))
    assert FcfsFullPolicy().schedule(fleet) == []


def test_fcfs_full_never_uses_host_blocks_and_skips_impossible_requests() -> None:
    # r0 can never fit a worker's whole GPU tier (1024 blocks): it is skipped, not blocking forever.
    fleet = FleetSnapshot(0.0, make_waiting(4000, 16), (make_worker("w0", gpu_free=1024, host_free=10**6),))
    out = FcfsFullPolicy().schedule(fleet)
    assert [d.request_id for d in out] == ["r1"]


def test_fcfs_full_picks_the_worker_with_most_free_gpu_and_skips_non_accepting() -> None:
    workers = (
        make_worker("busy", 20),
        make_worker("free", 200),
        make_worker("drained", 900, accepting=False),
    )
    out = FcfsFullPolicy().schedule(FleetSnapshot(0.0, make_waiting(16), workers))
    assert [(d.request_id, d.worker_id) for d in out] == [("r0", "free")]


def test_least_loaded_uses_host_layers_when_the_gpu_is_short() -> None:
    # 48 + 16 tokens → 4 blocks per layer; 13 free GPU blocks hold 3 layers.
    fleet = FleetSnapshot(0.0, make_waiting(48), (make_worker("w0", gpu_free=13, host_free=100),))
    (d,) = LeastLoadedPolicy().schedule(fleet)
    assert d.placement == interleaved(8, 3)
    assert d.placement.gpu_layers == 3 and d.placement.host_layers == 5


def test_least_loaded_prefers_the_emptier_worker_and_accounts_for_its_own_proposals() -> None:
    workers = (make_worker("a", gpu_free=40), make_worker("b", gpu_free=32))
    out = LeastLoadedPolicy().schedule(FleetSnapshot(0.0, make_waiting(16, 16, 16), workers))
    # each takes 16 blocks: a(40) → a(24) vs b(32) → b(16) vs a(24) → a
    assert [d.worker_id for d in out] == ["a", "b", "a"]
    assert all(d.placement == Placement.all_gpu(8) for d in out)


def test_least_loaded_stops_at_a_request_that_fits_nowhere_unless_told_to_skip() -> None:
    # r1 needs 2 blocks per layer: 5 layers fit the 10 GPU blocks, the other 3 need 6 host blocks.
    fleet = FleetSnapshot(0.0, make_waiting(4000, 16), (make_worker("w0", gpu_free=10, host_free=4),))
    assert LeastLoadedPolicy().schedule(fleet) == []
    skipping = make_policy("least-loaded", {"skip_blocked": True})
    assert [d.request_id for d in skipping.schedule(fleet)] == []  # r1: 6 host blocks > 4
    roomy = FleetSnapshot(0.0, make_waiting(4000, 16), (make_worker("w0", gpu_free=10, host_free=6),))
    assert [(d.request_id, d.placement) for d in skipping.schedule(roomy)] == [("r1", interleaved(8, 5))]
    assert LeastLoadedPolicy().schedule(roomy) == []  # strict order: r0 blocks the line
    no_host = make_policy("least-loaded", {"allow_host_layers": False})
    short = FleetSnapshot(0.0, make_waiting(48), (make_worker("w0", gpu_free=13, host_free=100),))
    assert no_host.schedule(short) == []


def test_registry_is_the_one_list_and_validates() -> None:
    assert {"fcfs-full", "least-loaded", "layerkv"} <= set(POLICIES)
    with pytest.raises(NotFound, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(InvalidArgument, match="bogus"):
        make_policy("least-loaded", {"bogus": 1})
    with pytest.raises(InvalidArgument, match="skip_blocked"):
        make_policy("least-loaded", {"skip_blocked": "maybe"})
    policy = make_policy("least-loaded", {"skip_blocked": True})
    assert policy_params(policy) == {"allow_host_layers": True, "skip_blocked": True}
    names = [d.name for d in describe_policies()]
    assert names == list(POLICIES)
    assert all(d.params_schema_json.startswith("{") for d in describe_policies())
