"""The budget ledger on the on-demand model: exact after any mix of dispatch, confirmation,
growth, preemption, finish, abort and worker failure (driven by the stub worker's own reports)."""

from __future__ import annotations

import random

import pytest

from common import kv_budget
from common.errors import ResourceExhausted
from common.kv_budget import BlockDemand
from common.proto.layerkv.v1 import types_pb2, worker_pb2
from common.types import FinishReason, KVGeometry, Placement, Tier, TierCapacity
from scheduler_svc.ledger import HoldState, Ledger
from scheduler_svc.testing.stub_worker import STUB_GEOMETRY, StubWorker
from scheduler_svc.wire import worker_event_from_proto
from scheduler_svc.worker_events import (
    RunningReport,
    StepInfo,
    StepKind,
    TierReport,
    TokenUpdate,
    WorkerEvent,
)

GEOMETRY = KVGeometry(num_layers=4, num_kv_heads=1, head_dim=8, block_size=4, dtype_bytes=4)
ALL_GPU = Placement.all_gpu(4)


def usage(gpu_per_layer: int, host_per_layer: int = 0) -> dict[str, TierReport]:
    return {
        "gpu": TierReport(64, 64 - 4 * gpu_per_layer, (gpu_per_layer,) * 4),
        "host": TierReport(32, 32 - 4 * host_per_layer, (host_per_layer,) * 4),
    }


def running(request_id: str, context: int, generated: int) -> RunningReport:
    return RunningReport(request_id, ALL_GPU, 0.0, context, generated)


def WorkerReport(finished: tuple[str, ...] = (), **fields: object) -> WorkerEvent:
    """A worker event from its parts; ``finished`` requests end in it."""
    ended = tuple(TokenUpdate(rid, (), True, FinishReason.STOP) for rid in finished)
    return WorkerEvent(tokens=ended, **fields)  # type: ignore[arg-type]


def worker_report_from_proto(event: worker_pb2.StreamEventsResponse) -> WorkerEvent:
    return worker_event_from_proto(event, STUB_GEOMETRY.num_layers)


def test_one_request_life_through_every_state() -> None:
    ledger = Ledger()
    ledger.add_worker("w", GEOMETRY, TierCapacity(gpu_blocks=64, host_blocks=32))
    budget = ledger.get("w")
    assert budget is not None
    # a: vLLM's rule (no headroom); b: 8 tokens of headroom (its whole max_tokens)
    a = ledger.try_reserve("w", "a@0", 8, ALL_GPU, max_tokens=8)
    b = ledger.try_reserve("w", "b@0", 8, ALL_GPU, max_tokens=8, headroom_tokens=8)
    assert a is not None and (a.gpu_blocks, a.headroom.gpu_blocks) == (8, 0)
    assert b is not None and (b.gpu_blocks, b.headroom.gpu_blocks) == (16, 8)
    assert budget.gpu_free == 40
    ledger.apply_report("w", WorkerReport(**usage(0)))  # predates the dispatches: still reserved
    assert budget.gpu_free == 40 and budget.gpu_reserved == 16
    # confirmed: the report counts the prompts (2 blocks per layer each), b keeps its headroom
    ledger.apply_report("w", WorkerReport(admitted=("a@0", "b@0"), **usage(4)))
    assert {h.state for h in budget.holdings.values()} == {HoldState.HELD}
    assert (budget.gpu_reserved, budget.headroom.gpu_blocks, budget.gpu_free) == (0, 8, 40)
    # growth: both hold 9 tokens (3 blocks per layer); b's headroom shrinks to its 16-token end
    grown = (running("a@0", 10, 2), running("b@0", 10, 2))
    ledger.apply_report("w", WorkerReport(running=grown, **usage(6)))
    assert (budget.headroom.gpu_blocks, budget.gpu_free) == (4, 36)
    # b preempted by recompute: no blocks now, its 10-token context (3 per layer) on re-admission
    step = StepInfo(7, StepKind.DECODE, 0.01, 1, num_preemptions=1)
    ledger.apply_report(
        "w",
        WorkerReport(
            running=(running("a@0", 11, 3),), waiting=("b@0",), preempted=("b@0",), step=step, **usage(3)
        ),
    )
    assert budget.holdings["b@0"].state is HoldState.WAITING
    assert (budget.gpu_reserved, budget.headroom.gpu_blocks, budget.gpu_free) == (12, 4, 36)
    assert (budget.preemptions, budget.num_preempted, budget.num_requests) == (1, 1, 2)
    # re-admitted: prefilled its 10 tokens and sampled one more
    back = (running("a@0", 12, 4), running("b@0", 11, 3))
    ledger.apply_report("w", WorkerReport(running=back, **usage(6)))
    assert (budget.gpu_reserved, budget.headroom.gpu_blocks, budget.gpu_free) == (0, 4, 36)
    # a finishes (its last event), b is aborted by the scheduler
    ledger.apply_report("w", WorkerReport(finished=("a@0",), running=(running("b@0", 12, 4),), **usage(3)))
    assert budget.gpu_free == 64 - 12 - 4
    assert ledger.release("w", "b@0") and not ledger.release("w", "b@0")
    ledger.apply_report("w", WorkerReport(**usage(0)))
    assert (budget.gpu_free, budget.holdings) == (64, {})
    # a lost worker takes its reservations with it; a returning one starts empty
    assert ledger.try_reserve("w", "c@0", 8, ALL_GPU) is not None
    ledger.remove_worker("w")
    assert ledger.get("w") is None and ledger.try_reserve("w", "d@0", 8, ALL_GPU) is None
    ledger.add_worker("w", GEOMETRY, TierCapacity(gpu_blocks=64, host_blocks=32))
    fresh = ledger.get("w")
    assert fresh is not None and (fresh.gpu_free, fresh.holdings) == (64, {})


@pytest.mark.parametrize(
    ("staging", "letters", "admitted"),
    [
        (0, ("HHGG",) * 3, 3),  # staging not reported: not checked
        (6, ("GHGH",) * 3, 2),  # 3 blocks per host layer: pairs hold 3, 6, then 9 > 6
        (6, ("HHGG",) * 2, 1),  # two adjacent host layers of 3 blocks: 6 fits once
        (5, ("HHGG",), 0),
        (6, ("GGGG",) * 3, 3),  # nothing streams through staging
    ],
)
def test_the_ledger_checks_the_staging_rule(staging: int, letters: tuple[str, ...], admitted: int) -> None:
    ledger = Ledger()
    ledger.add_worker("w", GEOMETRY, TierCapacity(gpu_blocks=64, host_blocks=64), staging_blocks=staging)
    got = [
        ledger.try_reserve("w", f"r{i}@0", 12, Placement.from_letters(x, 4)) is not None
        for i, x in enumerate(letters)
    ]
    assert sum(got) == admitted and got == sorted(got, reverse=True)


def test_no_room_in_either_tier_is_none() -> None:
    ledger = Ledger()
    ledger.add_worker("w", GEOMETRY, TierCapacity(gpu_blocks=40, host_blocks=20))
    assert ledger.try_reserve("w", "a@0", 16, Placement.from_letters("GHGH", 4)) is not None  # 8 + 8
    assert ledger.try_reserve("w", "b@0", 16, Placement.from_letters("HHHH", 4)) is None  # 16 host > 12
    assert ledger.try_reserve("w", "c@0", 4, ALL_GPU, max_tokens=200, headroom_tokens=200) is None
    assert ledger.try_reserve("nobody", "d@0", 4, ALL_GPU) is None


# ---- any mix, against the stub worker's own accounting ------------------------------------------


def _expected(
    stub: StubWorker, policy: dict[str, tuple[int, int]], inflight: dict[str, tuple]
) -> BlockDemand:
    """What the ledger must count: the stub's blocks in use, plus what each request was promised."""
    g = STUB_GEOMETRY
    total = stub.used()
    for r in stub.kv.running.values():
        headroom, end = policy[r.request_id]
        total = total + kv_budget.headroom(g, r.held_tokens, headroom, end, r.placement)
    for r in stub.kv.waiting:
        headroom, end = policy[r.request_id]
        total = total + kv_budget.demand(g, len(r.context), r.placement)
        total = total + kv_budget.headroom(g, len(r.context), headroom, end, r.placement)
    for tokens, placement, headroom, end in inflight.values():
        total = total + kv_budget.demand(g, tokens, placement)
        total = total + kv_budget.headroom(g, tokens, headroom, end, placement)
    return total


async def _send(
    stub: StubWorker, ledger: Ledger, inflight: dict[str, tuple], request: worker_pb2.DispatchRequest
) -> None:
    del inflight[request.request_id]
    try:
        await stub.Dispatch(request, None)  # type: ignore[arg-type]
    except ResourceExhausted:  # refused (no room, or preempted requests wait): the scheduler releases
        assert ledger.release("w", request.request_id)


GPU = 64  # 16 blocks per layer: a few requests at once, whose growth collides


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["recompute", "swap-layers"])
async def test_ledger_is_exact_after_any_mix(seed: int, mode: str) -> None:
    rng = random.Random(seed)
    capacity = TierCapacity(gpu_blocks=GPU, host_blocks=64)
    stub = StubWorker("w", gpu_blocks=GPU, host_blocks=64)
    ledger = Ledger()
    ledger.add_worker("w", STUB_GEOMETRY, capacity)
    policy: dict[str, tuple[int, int]] = {}  # rid -> (headroom tokens, end tokens)
    inflight: dict[str, tuple] = {}  # reserved, Dispatch not sent yet
    prompts: dict[str, worker_pb2.DispatchRequest] = {}
    preempted = 0
    for n in range(600):
        op = rng.random()
        if op < 0.3:
            rid = f"r{n}@0"
            tokens, max_tokens = rng.randint(1, 20), rng.randint(4, 40)
            headroom = rng.choice([0, 0, 0, 4, 1000])
            placement = Placement.from_letters("".join(rng.choice("GGGH") for _ in range(4)), 4)
            if kv_budget.never_fits(STUB_GEOMETRY, tokens + max_tokens, placement, capacity, 1 << 20):
                continue  # the policies never send one an empty worker could not finish
            if ledger.try_reserve(
                "w", rid, tokens, placement, max_tokens=max_tokens, headroom_tokens=headroom
            ) is None:
                continue
            policy[rid] = (headroom, tokens + max_tokens)
            inflight[rid] = (tokens, placement, headroom, tokens + max_tokens)
            prompts[rid] = worker_pb2.DispatchRequest(
                request_id=rid,
                prompt_token_ids=[rng.randint(1, 200) for _ in range(tokens)],
                sampling=types_pb2.SamplingParams(max_tokens=max_tokens),
                placement=placement.letters,
                preemption=mode,
            )
            if rng.random() < 0.7:  # most are sent at once, the others stay in flight a while
                await _send(stub, ledger, inflight, prompts[rid])
        elif op < 0.5 and inflight:
            await _send(stub, ledger, inflight, prompts[rng.choice(sorted(inflight))])
        elif op < 0.53:
            held = stub.running_ids + stub.waiting_ids
            if held:
                rid = rng.choice(sorted(held))
                assert (await stub.Abort(worker_pb2.AbortRequest(request_id=rid), None)).aborted  # type: ignore[arg-type]
                assert ledger.release("w", rid)
        elif op < 0.535:  # the worker dies: the scheduler forgets it, a new one starts empty
            ledger.remove_worker("w")
            stub = StubWorker("w", gpu_blocks=GPU, host_blocks=64)
            ledger.add_worker("w", STUB_GEOMETRY, capacity)
            inflight.clear()
        else:
            event = stub.step()
            preempted += event.step.num_preemptions
            ledger.apply_report("w", worker_report_from_proto(event))
            budget = ledger.get("w")
            assert budget is not None
            want = _expected(stub, policy, inflight)
            assert budget.committed_per_layer(Tier.GPU) == want.gpu_per_layer, n
            assert budget.committed_per_layer(Tier.HOST) == want.host_per_layer, n
            assert budget.gpu_free == max(0, GPU - want.gpu_blocks)
            assert set(budget.holdings) == set(stub.running_ids) | set(stub.waiting_ids) | set(inflight)
            assert {rid for rid, h in budget.holdings.items() if h.state is HoldState.WAITING} == set(
                stub.waiting_ids
            )
    # drain: every in-flight dispatch released, every request run to its end
    for rid in list(inflight):
        assert ledger.release("w", rid)
    for _ in range(500):
        if not (stub.running_ids or stub.waiting_ids):
            break
        event = stub.step()
        preempted += event.step.num_preemptions
        ledger.apply_report("w", worker_report_from_proto(event))
    ledger.apply_report("w", worker_report_from_proto(stub.step()))
    budget = ledger.get("w")
    assert budget is not None and budget.holdings == {}
    assert (budget.gpu_free, budget.host_free) == (GPU, 64)
    assert preempted > 0  # the mix did force preemptions


def test_incremental_sums_equal_a_full_resum_after_any_sequence() -> None:
    """The ledger keeps pending and headroom sums incrementally; after any mix of reservations,
    reports (admission, growth, preemption, swapped layers), finishes and releases they must equal
    the sums over every holding recomputed from scratch."""
    rng = random.Random(7)
    ledger = Ledger()
    ledger.add_worker("w", GEOMETRY, TierCapacity(10_000, 10_000))
    placements = [ALL_GPU, Placement.from_letters("GHGH", 4), Placement.from_letters("HHHH", 4)]
    live: dict[str, int] = {}  # request id -> context tokens
    for i in range(400):
        op = rng.random()
        if op < 0.35 or not live:
            rid = f"r{i}"
            tokens = rng.randint(1, 40)
            placement = rng.choice(placements)
            headroom = rng.choice([0, 8, 100])
            if ledger.try_reserve("w", rid, tokens, placement, max_tokens=20, headroom_tokens=headroom):
                live[rid] = tokens
        elif op < 0.8:
            ids = rng.sample(sorted(live), k=min(len(live), rng.randint(1, 5)))
            waiting = tuple(r for r in ids if rng.random() < 0.2)
            reports = []
            for r in ids:
                if r in waiting:
                    continue
                live[r] += rng.randint(0, 2)
                reports.append(RunningReport(r, rng.choice(placements), 0.0, live[r], 1))
            done = tuple(r for r in ids if r not in waiting and rng.random() < 0.1)
            ledger.apply_report(
                "w", WorkerReport(done, running=tuple(x for x in reports if x.worker_request_id not in done),
                                  admitted=tuple(ids), waiting=waiting)
            )
            for r in done:
                live.pop(r)
        else:
            rid = rng.choice(sorted(live))
            assert ledger.release("w", rid)
            live.pop(rid)
        budget = ledger.get("w")
        assert budget is not None and set(budget.holdings) == set(live)
        pending = headroom = BlockDemand.zero(4)
        for h in budget.holdings.values():
            pending = pending + h.pending(GEOMETRY)
            headroom = headroom + h.headroom(GEOMETRY)
        free = (budget.gpu_free, budget.host_free)  # read before the per-layer sums are built
        assert (budget.pending, budget.headroom) == (pending, headroom), i
        total = pending + headroom
        assert free == (
            max(0, budget.gpu.free_blocks - total.gpu_blocks),
            max(0, budget.host.free_blocks - total.host_blocks),
        ), i
        assert budget.num_preempted == sum(h.state is HoldState.WAITING for h in budget.holdings.values())


def test_free_blocks_are_read_without_building_per_layer_sums() -> None:
    """Admission reads a worker's free blocks after every hold: from two integers per placement,
    not by rebuilding the per-layer pending / headroom tuples each hold invalidates."""
    ledger = Ledger()
    ledger.add_worker("w", GEOMETRY, TierCapacity(1_000, 1_000))
    budget = ledger.get("w")
    assert budget is not None
    for i, letters in enumerate(("GGGG", "GHGH", "HHHH", "GGGG")):
        assert ledger.try_reserve("w", f"r{i}", 20, Placement.from_letters(letters, 4), max_tokens=20,
                                  headroom_tokens=8)
    assert budget._totals is None
    gpu, host = budget.gpu_free, budget.host_free
    assert budget._totals is None
    total = budget.pending + budget.headroom
    assert (gpu, host) == (1_000 - total.gpu_blocks, 1_000 - total.host_blocks)
