"""Decisions of the ``layerkv`` policy on constructed fleet snapshots (no services involved).

Numbers are chosen to be exact in binary floating point so that the admission boundary (a slack
that reaches exactly zero) is tested on both sides.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from common.types import CostModel, KVGeometry, Placement
from scheduler_svc.policies.base import (
    FleetSnapshot,
    PreemptionMode,
    PrefillInFlight,
    RunningRequest,
    WaitingRequest,
    WorkerSnapshot,
)
from scheduler_svc.policies.layerkv import LayerKVParams, LayerKVPolicy

# 8 layers, 1 KV head of 4 floats, 16-token blocks: one layer of n tokens is 32·n bytes.
GEOMETRY = KVGeometry(num_layers=8, num_kv_heads=1, head_dim=4, block_size=16, dtype_bytes=4)
# Prefill 2^-10 s per token; decode steps 0.25 s flat; offload far faster than prefill.
FAST_LINK = CostModel(
    d2h_bytes_per_s=1e30, h2d_bytes_per_s=1e30, prefill_per_token_s=2.0**-10, decode_base_s=0.25
)


def make_worker(
    worker_id: str = "w0",
    *,
    gpu_free: int = 10_000,
    host_free: int = 10_000,
    cost: CostModel = FAST_LINK,
    running: tuple[RunningRequest, ...] = (),
    accepting: bool = True,
    max_model_len: int = 1 << 20,
    staging: int = 0,
    host_used: tuple[int, ...] = (),
) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id=worker_id,
        geometry=GEOMETRY,
        gpu_blocks_total=max(gpu_free, 1),
        host_blocks_total=max(host_free, 1),
        gpu_blocks_free=gpu_free,
        host_blocks_free=host_free,
        max_model_len=max_model_len,
        cost_model=cost,
        running=running,
        accepting=accepting,
        staging_blocks_total=staging,
        host_used_per_layer=host_used,
    )


def make_waiting(
    request_id: str,
    prompt: int,
    *,
    arrival: float = 0.0,
    max_tokens: int = 8,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    hint: int | None = None,
) -> WaitingRequest:
    return WaitingRequest(request_id, prompt, max_tokens, arrival, ttft_slo, tpot_slo, hint)


def make_running(
    request_id: str = "r0",
    *,
    generated: int = 11,
    max_tokens: int = 21,
    decode_time: float = 2.5,
    tpot_slo: float | None = 0.5,
    prompt: int = 16,
    hint: int | None = None,
) -> RunningRequest:
    return RunningRequest(
        request_id,
        prompt,
        max_tokens,
        generated,
        decode_time,
        tpot_slo,
        Placement.all_gpu(GEOMETRY.num_layers),
        hint,
    )


def fleet(*workers: WorkerSnapshot, waiting: tuple[WaitingRequest, ...]) -> FleetSnapshot:
    return FleetSnapshot(now=100.0, waiting=waiting, workers=workers)


def policy(**params: object) -> LayerKVPolicy:
    return LayerKVPolicy(LayerKVParams.model_validate(params))


# ---- placement: count and pattern ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("offloadable", "letters"),
    [
        (8, "HHHHHHHH"),  # link fast enough to hide every layer
        (6, "HHHGHHHG"),
        (4, "HGHGHGHG"),  # the paper's example: 1, 3, 5, 7 stay
        (1, "GGGGGGHG"),
        (0, "GGGGGGGG"),  # link too slow to hide even one layer
    ],
)
def test_placement_is_the_minimum_resident_layers_interleaved(offloadable: int, letters: str) -> None:
    # Prefill of n tokens takes n·1e-3 s; a layer is 32·n bytes: a link of 32·k/1e-3 B/s hides k layers.
    cost = CostModel(d2h_bytes_per_s=32 * offloadable / 1e-3 + 1e-6, prefill_per_token_s=1e-3)
    got = policy().schedule(fleet(make_worker(cost=cost), waiting=(make_waiting("a", 152),)))
    assert [d.placement.letters for d in got] == [letters]
    assert got[0].placement.gpu_layers == 8 - offloadable


@pytest.mark.parametrize(
    ("gpu_free", "host_free", "letters"),
    [
        (40, 40, "HGHGHGHG"),  # the rule's 4 GPU layers of 10 blocks fit
        (25, 60, "HHHGHHHG"),  # GPU short: 2 GPU layers, as long as the 60 host blocks suffice
        (9, 80, "HHHHHHHH"),  # not even one GPU layer: all host
        (25, 59, None),  # GPU short and host short: wait
        (80, 30, "GHGGHGHG"),  # host short: 5 GPU layers, so that 30 host blocks suffice
        (45, 30, None),  # host needs 5 GPU layers, GPU holds 4: wait
    ],
)
def test_placement_fits_the_free_budget(gpu_free: int, host_free: int, letters: str | None) -> None:
    cost = CostModel(d2h_bytes_per_s=32 * 4 / 1e-3 + 1e-6, prefill_per_token_s=1e-3)  # rule: 4 resident
    worker = make_worker(cost=cost, gpu_free=gpu_free, host_free=host_free)
    got = policy().schedule(
        fleet(worker, waiting=(make_waiting("a", 152),))
    )  # 152 + 8 tokens: 10 blocks per layer
    assert [d.placement.letters for d in got] == ([] if letters is None else [letters])


def test_placements_in_one_round_share_the_budget() -> None:
    cost = CostModel(d2h_bytes_per_s=32 * 4 / 1e-3 + 1e-6, prefill_per_token_s=1e-3)  # rule: 4 resident
    worker = make_worker(cost=cost, gpu_free=60, host_free=120)
    waiting = tuple(make_waiting(f"q{i}", 152, arrival=i) for i in range(4))
    got = policy().schedule(fleet(worker, waiting=waiting))
    # 40 GPU + 40 host for the first; 20 GPU left → 2 GPU layers + 60 host; then 20 host left: wait.
    assert [(d.request_id, d.placement.letters) for d in got] == [("q0", "HGHGHGHG"), ("q1", "HHHGHHHG")]


def test_unhidden_offload_is_charged_to_the_prefill() -> None:
    cost = CostModel(d2h_bytes_per_s=32 * 4 / 1e-3, prefill_per_token_s=1e-3)
    worker = make_worker(cost=cost)
    rule = Placement.from_letters("HGHGHGHG", 8)
    all_host = Placement.from_letters("HHHHHHHH", 8)
    assert LayerKVPolicy.predicted_prefill_s(160, rule, worker) == pytest.approx(0.16)
    assert LayerKVPolicy.predicted_prefill_s(160, all_host, worker) == pytest.approx(0.32)


# ---- admission: the TPOT slack -------------------------------------------------------------------
# The running request: SLO 0.5 s, 11 tokens generated, 10 to go (max_tokens 21), 2.5 s of decode
# used, steps of 0.25 s: slack = 0.5·(21 − 1) − 2.5 − 10·0.25 = 5.0 s (TPOT counts the 20 gaps
# after the first token). Prefill is 2^-10 s per token.


@pytest.mark.parametrize(
    ("prompts", "safety", "reserve", "admitted"),
    [
        ((5120,), 1.0, 0.0, ["a"]),  # 5.0 s of prefill: slack exactly zero, still kept
        ((5121,), 1.0, 0.0, []),  # one token more: slack negative, refused
        ((4096,), 1.25, 0.0, ["a"]),  # 4.0 s x 1.25 = 5.0: exactly on the boundary
        ((4097,), 1.25, 0.0, []),
        ((4096,), 1.0, 1.0, ["a"]),  # 4.0 s + 1.0 s reserve = 5.0
        ((4097,), 1.0, 1.0, []),
        ((2048, 3072), 1.0, 0.0, ["a", "b"]),  # the round's sum: 2.0 + 3.0 = 5.0
        ((2048, 3073), 1.0, 0.0, ["a"]),  # 2.0 + 3.0009 > 5.0: the second waits
    ],
)
def test_admission_refused_exactly_when_a_slack_goes_negative(
    prompts: tuple[int, ...], safety: float, reserve: float, admitted: list[str]
) -> None:
    worker = make_worker(running=(make_running(),))
    # 16 output tokens: a newcomer's own slack (0.5 − 0.25)·15 = 3.75 s covers the 3.0 s after it
    waiting = tuple(
        make_waiting(name, n, arrival=i, max_tokens=16)
        for i, (name, n) in enumerate(zip("ab", prompts, strict=False))
    )
    got = policy(prefill_safety=safety, slack_reserve_s=reserve).schedule(fleet(worker, waiting=waiting))
    assert [d.request_id for d in got] == admitted


def test_smallest_slack_decides() -> None:
    roomy = make_running("roomy", decode_time=0.5)  # slack 7.0 s
    tight = make_running("tight", decode_time=4.5)  # slack 3.0 s
    worker = make_worker(running=(roomy, tight))
    ok = policy(prefill_safety=1.0).schedule(fleet(worker, waiting=(make_waiting("a", 3072),)))
    refused = policy(prefill_safety=1.0).schedule(fleet(worker, waiting=(make_waiting("a", 3073),)))
    assert [d.request_id for d in ok] == ["a"]
    assert refused == []


def test_admission_accounts_for_the_longer_decode_steps_it_causes() -> None:
    # Steps of 0.25 s + 0.125 s per request: with the running request alone 0.375 s
    # (slack 0.5·20 − 1.25 − 10·0.375 = 5.0), with the newcomer 0.5 s (slack 3.75 s).
    cost = replace(FAST_LINK, decode_per_request_s=0.125)
    worker = make_worker(cost=cost, running=(make_running(decode_time=1.25),))
    at_boundary = policy(prefill_safety=1.0).schedule(fleet(worker, waiting=(make_waiting("a", 3840),)))
    above = policy(prefill_safety=1.0).schedule(fleet(worker, waiting=(make_waiting("a", 3841),)))
    assert [d.request_id for d in at_boundary] == ["a"]  # 3.75 s of prefill
    assert above == []


def test_request_slo_overrides_the_policy_default() -> None:
    # Without its own SLO the running request takes the default 0.5 s (slack 5.0 s); with 0.375 s
    # of its own its slack is 0.375·20 − 2.5 − 2.5 = 2.5 s.
    worker_default = make_worker(running=(make_running(tpot_slo=None),))
    worker_own = make_worker(running=(make_running(tpot_slo=0.375),))
    p = policy(prefill_safety=1.0, default_tpot_slo_s=0.5)
    assert [d.request_id for d in p.schedule(fleet(worker_default, waiting=(make_waiting("a", 5120),)))] == [
        "a"
    ]
    assert p.schedule(fleet(worker_own, waiting=(make_waiting("a", 2561),))) == []
    assert [d.request_id for d in p.schedule(fleet(worker_own, waiting=(make_waiting("a", 2560),)))] == ["a"]


@pytest.mark.parametrize(("protect", "admitted"), [(False, ["a"]), (True, [])])
def test_requests_already_lost_block_admission_only_when_protected(
    protect: bool, admitted: list[str]
) -> None:
    lost = make_running("lost", decode_time=8.0)  # slack 0.5·20 − 8 − 2.5 = −0.5 before any admission
    worker = make_worker(running=(lost,))
    got = policy(protect_lost_requests=protect).schedule(fleet(worker, waiting=(make_waiting("a", 16),)))
    assert [d.request_id for d in got] == admitted


def test_mean_output_prediction_uses_finished_requests() -> None:
    p = policy(output_prediction="mean", prefill_safety=1.0)
    # Round 1: two requests running; then both vanish after 12 tokens: mean output is 12.
    first = make_worker(running=(make_running("x", generated=12), make_running("y", generated=12)))
    assert p.schedule(fleet(first, waiting=())) == []
    assert p.mean_output_tokens is None
    running = make_running("r", generated=10, max_tokens=100, decode_time=2.5)
    # With max_tokens the slack is 0.5·99 − 2.5 − 90·0.25 = 24.5 s; with the mean (2 more tokens)
    # it is 0.5·11 − 2.5 − 2·0.25 = 2.5 s: a 4 s prefill now waits.
    second = make_worker(running=(running,))
    assert p.schedule(fleet(second, waiting=(make_waiting("a", 4096),))) == []
    assert p.mean_output_tokens == pytest.approx(12.0)
    upper = policy(output_prediction="max_tokens", prefill_safety=1.0)
    assert [d.request_id for d in upper.schedule(fleet(second, waiting=(make_waiting("a", 4096),)))] == ["a"]


# ---- worker choice ---------------------------------------------------------------------------


def test_worker_with_the_best_predicted_ttft_wins() -> None:
    slow = make_worker("slow", cost=replace(FAST_LINK, correction=2.0))
    fast = make_worker("fast")
    got = policy().schedule(fleet(slow, fast, waiting=(make_waiting("a", 1024),)))
    assert [(d.request_id, d.worker_id) for d in got] == [("a", "fast")]


def test_round_prefills_spread_requests_over_workers() -> None:
    w0, w1 = make_worker("w0"), make_worker("w1")
    waiting = tuple(make_waiting(f"q{i}", 1024, arrival=i) for i in range(4))
    got = policy().schedule(fleet(w0, w1, waiting=waiting))
    # Each prefill queues behind the ones already given to the same worker this round.
    assert [d.worker_id for d in got] == ["w0", "w1", "w0", "w1"]


def test_worker_refusing_on_slack_or_health_is_passed_over() -> None:
    busy = make_worker("busy", running=(make_running(decode_time=4.5),))  # slack 3.0 s
    draining = make_worker("draining", accepting=False)
    idle = make_worker("idle", cost=replace(FAST_LINK, correction=1.5))  # slower, but free
    got = policy(prefill_safety=1.0).schedule(fleet(busy, draining, idle, waiting=(make_waiting("a", 4096),)))
    assert [d.worker_id for d in got] == ["idle"]


def test_no_worker_fits_the_model_length() -> None:
    worker = make_worker(max_model_len=100)
    assert policy().schedule(fleet(worker, waiting=(make_waiting("a", 96, max_tokens=8),))) == []


def test_max_prefill_tokens_per_round() -> None:
    worker = make_worker()
    waiting = tuple(make_waiting(f"q{i}", 600, arrival=i) for i in range(3))
    got = policy(max_prefill_tokens_per_round=1200).schedule(fleet(worker, waiting=waiting))
    assert [d.request_id for d in got] == ["q0", "q1"]
    # A single prompt longer than the cap still goes when it is the round's first.
    got = policy(max_prefill_tokens_per_round=100).schedule(fleet(worker, waiting=waiting))
    assert [d.request_id for d in got] == ["q0"]


# ---- queue order -----------------------------------------------------------------------------


def test_queue_order_fcfs_and_ttft_deadline() -> None:
    # Only one fits (host blocks for 10 blocks x 8 layers); 'late' arrived later but is due sooner.
    worker = make_worker(gpu_free=0, host_free=80)
    waiting = (
        make_waiting("early", 152, arrival=1.0, ttft_slo=30.0),
        make_waiting("late", 152, arrival=2.0, ttft_slo=5.0),
    )
    assert [d.request_id for d in policy(queue_order="fcfs").schedule(fleet(worker, waiting=waiting))] == [
        "early"
    ]
    got = policy(queue_order="ttft-deadline").schedule(fleet(worker, waiting=waiting))
    assert [d.request_id for d in got] == ["late"]


def test_blocked_head_stops_the_round_unless_skipping() -> None:
    # 40 host blocks free of 1000: 152 + 8 tokens need 80, so "long" must wait for them.
    worker = replace(make_worker(gpu_free=0, host_free=40), host_blocks_total=1000)
    waiting = (make_waiting("long", 152, arrival=1.0), make_waiting("short", 16, arrival=2.0))
    assert policy().schedule(fleet(worker, waiting=waiting)) == []
    got = policy(skip_blocked=True).schedule(fleet(worker, waiting=waiting))
    assert [d.request_id for d in got] == ["short"]


# ---- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"queue_order": "lifo"},
        {"output_prediction": "oracle"},
        {"prefill_safety": 0.5},
        {"default_tpot_slo_s": 0.0},
        {"max_prefill_tokens_per_round": 0},
        {"slack_gate": "sometimes"},
        {"use_output_hint": "maybe"},
        {"newcomer_tpot_check": "x"},
        {"unknown": 1},
    ],
)
def test_bad_parameters_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LayerKVParams.model_validate(bad)


# ---- the on-demand memory model: the prompt's blocks plus headroom_blocks of growth ----------


@pytest.mark.parametrize(
    ("headroom_blocks", "max_tokens", "host_free", "admitted", "headroom_tokens"),
    [
        # 80 host blocks hold 10 blocks x 8 layers; the prompt of 152 tokens takes 10 per layer
        (0, 5000, 80, ["a"], 0),  # vLLM's rule: the prompt alone, whatever max_tokens says
        (1, 5000, 80, [], 16),  # one block per layer of growth: 11 x 8 = 88 > 80
        (1, 5000, 88, ["a"], 16),
        (1, 8, 80, ["a"], 8),  # headroom never past max_tokens: 152 + 8 = 160 tokens, 10 blocks
        (1, 9, 80, [], 9),  # 161 tokens: 11 blocks
        (1000, 8, 80, ["a"], 8),  # a large headroom is the whole-request reservation
        (1000, 200, 80, [], 200),
    ],
)
def test_budget_counts_the_prompt_plus_the_headroom(
    headroom_blocks: int, max_tokens: int, host_free: int, admitted: list[str], headroom_tokens: int
) -> None:
    worker = make_worker(gpu_free=0, host_free=host_free)
    p = policy(headroom_blocks=headroom_blocks)
    got = p.schedule(fleet(worker, waiting=(make_waiting("a", 152, max_tokens=max_tokens),)))
    assert [d.request_id for d in got] == admitted
    assert p.headroom_tokens(make_waiting("a", 152, max_tokens=max_tokens), worker) == headroom_tokens
    assert all(d.headroom_tokens == headroom_tokens for d in got)


@pytest.mark.parametrize("max_tokens", [8, 5000, 1 << 19])
def test_placement_follows_the_rule_for_the_prompt_whatever_max_tokens(max_tokens: int) -> None:
    cost = CostModel(d2h_bytes_per_s=32 * 4 / 1e-3 + 1e-6, prefill_per_token_s=1e-3)  # rule: 4 resident
    # 40 GPU blocks: the rule's 4 GPU layers of 10 blocks (prompt + one block of headroom).
    worker = make_worker(cost=cost, gpu_free=44, host_free=44)
    got = policy().schedule(fleet(worker, waiting=(make_waiting("a", 144, max_tokens=max_tokens),)))
    assert [d.placement.letters for d in got] == ["HGHGHGHG"]


@pytest.mark.parametrize(
    ("params", "mode"),
    [({}, PreemptionMode.SWAP_LAYERS), ({"preemption": "recompute"}, PreemptionMode.RECOMPUTE)],
)
def test_dispatch_carries_the_preemption_mode(params: dict[str, object], mode: PreemptionMode) -> None:
    (d,) = policy(**params).schedule(fleet(make_worker(), waiting=(make_waiting("a", 16),)))
    assert d.preemption is mode
    with pytest.raises(ValidationError):
        LayerKVParams.model_validate({"preemption": "drop"})


# ---- chunked prefill: every chunk step stalls each running decode ---------------------------------
# Prefill of n tokens: 2^-4 s per step + 2^-10 s per token + 2^-20 s per token² (attention): one
# step of 4096 tokens takes 0.0625 + 4 + 16 s; in chunks the tokens and attention cost the same and
# every further chunk pays the per-step base again.
CHUNKED = CostModel(
    d2h_bytes_per_s=1e30,
    prefill_base_s=2.0**-4,
    prefill_per_token_s=2.0**-10,
    prefill_per_token2_s=2.0**-20,
)


@pytest.mark.parametrize(
    ("tokens", "chunk", "expected_s"),
    [
        (4096, 0, 20.0625),  # unchunked: one step
        (4096, 4096, 20.0625),
        (4096, 5000, 20.0625),
        (4096, 2048, 20.125),  # two steps: one more base
        (4096, 1024, 20.25),
        (4096, 1000, 20.3125),  # five steps, the last one short
        (4096, 1, 20.0625 + 4095 * 0.0625),  # one token per step
        (8192, 1, 0.0625 + 8 + 64 + 8191 * 0.0625),  # beyond MAX_CHUNK_STEPS: the same sum, closed form
    ],
)
def test_chunked_prefill_charge_is_the_sum_of_its_steps(tokens: int, chunk: int, expected_s: float) -> None:
    worker = make_worker(cost=CHUNKED)
    placement = Placement.all_gpu(8)
    assert LayerKVPolicy.predicted_prefill_s(tokens, placement, worker, chunk) == pytest.approx(expected_s)


def test_offload_bound_chunks_are_charged_their_offload() -> None:
    # All 8 layers on the host, 32 bytes per token per layer, a link of 2^17 B/s: each token's
    # offload takes 2^-9 s, more than its 2^-10 s compute, so each chunk of 2048 takes 4 s.
    cost = CostModel(d2h_bytes_per_s=2.0**17, prefill_base_s=2.0**-4, prefill_per_token_s=2.0**-10)
    worker = make_worker(cost=cost)
    all_host = Placement.from_letters("H" * 8, 8)
    assert LayerKVPolicy.predicted_prefill_s(4096, all_host, worker, 2048) == pytest.approx(8.0)
    # ... while all on the GPU it is compute: 2 x (0.0625 + 2) s
    assert LayerKVPolicy.predicted_prefill_s(4096, Placement.all_gpu(8), worker, 2048) == pytest.approx(4.125)


@pytest.mark.parametrize(
    ("budget", "prompt", "admitted"),
    [
        # The running request's slack is 5.0 s (see above); prefill 2^-10 s per token + 0.25 s per
        # step; the budget less the one running decode leaves chunks of 2048 tokens.
        (2049, 4096, ["a"]),  # 2 chunk steps: 4.0 + 0.5
        (2049, 4352, ["a"]),  # 3 chunk steps: 4.25 + 0.75 = 5.0, exactly the slack
        (2049, 4353, []),
        (0, 4353, ["a"]),  # unchunked (budget not reported): 4.25 + 0.25
        (1025, 4096, ["a"]),  # chunks of 1024: 4.0 + 4 x 0.25 = 5.0
        (1025, 4097, []),  # a fifth chunk step
        (1025, 3840, ["a"]),  # 3.75 + 4 x 0.25 = 4.75
    ],
)
def test_slack_gate_charges_every_chunk_step(budget: int, prompt: int, admitted: list[str]) -> None:
    cost = replace(FAST_LINK, prefill_base_s=0.25)
    worker = replace(make_worker(cost=cost, running=(make_running(),)), max_num_batched_tokens=budget)
    got = policy(prefill_safety=1.0).schedule(fleet(worker, waiting=(make_waiting("a", prompt),)))
    assert [d.request_id for d in got] == admitted


def test_a_worker_with_preempted_requests_waiting_takes_no_new_one() -> None:
    busy = replace(make_worker("busy"), requests_preempted=1)
    other = make_worker("other", cost=replace(FAST_LINK, correction=4.0))  # slower, but free to take it
    got = policy().schedule(fleet(busy, other, waiting=(make_waiting("a", 16),)))
    assert [d.worker_id for d in got] == ["other"]


def test_chunk_size_is_the_budget_less_the_running_decodes() -> None:
    running = tuple(make_running(f"r{i}") for i in range(3))
    worker = replace(make_worker(running=running), max_num_batched_tokens=2048)
    assert LayerKVPolicy.chunk_tokens(worker) == 2045
    assert LayerKVPolicy.chunk_tokens(replace(worker, max_num_batched_tokens=2)) == 1
    assert LayerKVPolicy.chunk_tokens(replace(worker, max_num_batched_tokens=0)) == 0


# ---- staging: host layers stream through GPU staging blocks, two adjacent layers at a time ------


@pytest.mark.parametrize(
    ("staging", "host_used", "gpu_free", "letters"),
    [
        (0, (), 0, "HHHHHHHH"),  # staging not reported: not checked
        (20, (), 0, "HHHHHHHH"),  # two adjacent host layers of 10 blocks: exactly 20
        (19, (), 100, "HGHGHGHG"),  # 20 > 19: keep every other layer on the GPU, pairs need 10
        (19, (), 39, None),  # ... but the GPU holds only 3 layers of 10 blocks: wait
        (30, (10,) * 8, 100, "HGHGHGHG"),  # 10 + 10 already there, + 10 new in one layer of each pair
        (29, (10,) * 8, 100, "GGGGGGGG"),  # any new host layer overflows a pair: all on the GPU
        (29, (10,) * 8, 79, None),  # ... which needs 80 GPU blocks: wait
    ],
)
def test_placement_respects_the_staging_blocks(
    staging: int, host_used: tuple[int, ...], gpu_free: int, letters: str | None
) -> None:
    worker = make_worker(gpu_free=gpu_free, host_free=1000, staging=staging, host_used=host_used)
    got = policy().schedule(fleet(worker, waiting=(make_waiting("a", 152),)))  # 10 blocks per layer
    assert [d.placement.letters for d in got] == ([] if letters is None else [letters])


def test_staging_demand_accumulates_within_a_round() -> None:
    worker = make_worker(gpu_free=40, host_free=1000, staging=30)
    waiting = tuple(make_waiting(f"q{i}", 152, arrival=i) for i in range(3))
    got = policy().schedule(fleet(worker, waiting=waiting))
    # q0 all host (pairs 20); q1 must keep every other layer on the GPU (pairs 30); q2 finds no
    # GPU blocks left for the layers staging cannot take.
    assert [(d.request_id, d.placement.letters) for d in got] == [("q0", "HHHHHHHH"), ("q1", "HGHGHGHG")]


def test_a_request_no_empty_worker_could_hold_does_not_block_the_queue() -> None:
    # 80 host blocks in total: 152 + 8 tokens (80 blocks) fit an empty worker, 312 + 8 never do.
    worker = replace(make_worker(gpu_free=0, host_free=80), host_blocks_total=80, gpu_blocks_total=0)
    waiting = (make_waiting("huge", 312, arrival=1.0), make_waiting("ok", 152, arrival=2.0))
    assert [d.request_id for d in policy().schedule(fleet(worker, waiting=waiting))] == ["ok"]
    # One that fits an empty worker but not now still blocks (strict order).
    busy = replace(worker, host_blocks_free=40)
    assert (
        policy().schedule(fleet(busy, waiting=(make_waiting("ok", 152), make_waiting("s", 16, arrival=3.0))))
        == []
    )


# ---- the newcomer's own TPOT -------------------------------------------------------------------
# The running request has a loose SLO (it never binds here); decode steps are 0.25 s plus 0.125 s
# per request: with the newcomer added, 0.5 s. Host-placed layers stream 32 bytes per token per
# layer every step: 4 host layers of a 152-token prompt add 19456 B / (19456·4 B/s) = 0.25 s.
RULE4 = CostModel(  # the placement rule keeps 4 of 8 layers on the GPU
    d2h_bytes_per_s=32 * 4 / 1e-3 + 1e-6,
    h2d_bytes_per_s=19456 * 4.0,
    prefill_per_token_s=1e-3,
    decode_base_s=0.25,
)


@pytest.mark.parametrize(
    ("params", "newcomer_slo", "admitted"),
    [
        ({}, 0.5, ["a"]),  # its step with it added: exactly its SLO
        ({}, 0.4375, []),  # its own TPOT would be missed
        ({"newcomer_tpot_check": False}, 0.4375, ["a"]),
        ({"slack_gate": False}, 0.4375, ["a"]),  # the ablation: placement only
        ({"default_tpot_slo_s": 0.4375}, None, []),  # no SLO of its own: the policy default
        ({"default_tpot_slo_s": 0.5}, None, ["a"]),
    ],
)
def test_newcomer_own_tpot_check(
    params: dict[str, object], newcomer_slo: float | None, admitted: list[str]
) -> None:
    cost = replace(FAST_LINK, decode_per_request_s=0.125)
    worker = make_worker(cost=cost, running=(make_running(tpot_slo=10.0),))
    waiting = (make_waiting("a", 16, tpot_slo=newcomer_slo),)
    assert [d.request_id for d in policy(**params).schedule(fleet(worker, waiting=waiting))] == admitted


@pytest.mark.parametrize(
    ("gpu_free", "newcomer_slo", "letters"),
    [
        (80, 0.5, "HGHGHGHG"),  # the rule's placement: 0.25 s step + 0.25 s streaming, within 0.5 s
        (80, 0.375, "GGGGGGGG"),  # streaming breaks its TPOT: all layers on the GPU instead
        (60, 0.375, "GGHGGGHG"),  # the GPU holds 6 layers: 2 host layers stream 0.125 s, just fits
        (60, 0.34375, None),  # ... and miss a tighter SLO: it waits
        (40, 0.375, None),  # the GPU holds only the rule's 4: it waits
    ],
)
def test_newcomer_check_counts_its_host_layer_streaming(
    gpu_free: int, newcomer_slo: float, letters: str | None
) -> None:
    worker = make_worker(cost=RULE4, gpu_free=gpu_free, host_free=80, running=(make_running(tpot_slo=10.0),))
    got = policy().schedule(fleet(worker, waiting=(make_waiting("a", 152, tpot_slo=newcomer_slo),)))
    assert [d.placement.letters for d in got] == ([] if letters is None else [letters])


def test_an_idle_worker_takes_a_newcomer_whose_slo_no_step_meets() -> None:
    # 0.25 s steps against a 0.125 s SLO: no placement or wait makes it faster, refusing would starve it.
    waiting = (make_waiting("a", 16, tpot_slo=0.125),)
    assert [d.request_id for d in policy().schedule(fleet(make_worker(), waiting=waiting))] == ["a"]
    busy = make_worker(running=(make_running(tpot_slo=10.0),))
    assert policy().schedule(fleet(busy, waiting=waiting)) == []


def test_an_admitted_newcomer_is_protected_from_the_prefills_after_it() -> None:
    # a: 8 output tokens, SLO 0.5 s, steps 0.25 s: its own slack is (0.5 − 0.25)·7 = 1.75 s, which
    # b's prefill (2^-10 s per token) must fit; a's own prefill runs before its first token.
    worker = make_worker()
    for b_prompt, admitted in ((1792, ["a", "b"]), (1793, ["a"])):
        waiting = (make_waiting("a", 4096, tpot_slo=0.5), make_waiting("b", b_prompt, arrival=1.0))
        got = policy(prefill_safety=1.0).schedule(fleet(worker, waiting=waiting))
        assert [d.request_id for d in got] == admitted


# ---- prefills in flight: dispatched, not reported running yet ------------------------------------


def in_flight(
    request_id: str, prompt: int, *, max_tokens: int = 8, tpot_slo: float | None = 0.5
) -> PrefillInFlight:
    return PrefillInFlight(request_id, prompt, max_tokens, Placement.all_gpu(8), tpot_slo, 99.0)


@pytest.mark.parametrize(
    ("prefilling", "prompt", "admitted"),
    [
        ((), 5120, ["a"]),  # the running request's 5.0 s of slack, all free
        ((in_flight("f", 4096, tpot_slo=100.0),), 1024, ["a"]),  # 4.0 s in flight + 1.0 s = 5.0 s
        ((in_flight("f", 4096, tpot_slo=100.0),), 1025, []),
        ((in_flight("f", 2048, tpot_slo=100.0), in_flight("g", 2048, tpot_slo=100.0)), 1025, []),
        ((in_flight("f", 6144, tpot_slo=100.0),), 16, []),  # already over-committed: nothing more
    ],
)
def test_prefills_in_flight_are_charged_to_the_running_slack(
    prefilling: tuple[PrefillInFlight, ...], prompt: int, admitted: list[str]
) -> None:
    worker = replace(make_worker(running=(make_running(),)), prefilling=prefilling)
    waiting = (make_waiting("a", prompt, tpot_slo=100.0),)
    got = policy(prefill_safety=1.0).schedule(fleet(worker, waiting=waiting))
    assert [d.request_id for d in got] == admitted


@pytest.mark.parametrize(("prompt", "admitted"), [(1792, ["a"]), (1793, [])])
def test_a_prefill_in_flight_is_protected_as_the_decode_it_becomes(prompt: int, admitted: list[str]) -> None:
    # Nothing runs yet; f (8 tokens, SLO 0.5 s) will decode in 0.25 s steps: slack (0.5 − 0.25)·7
    # = 1.75 s against the newcomer's prefill after it. The worker is not idle: f is on its way.
    worker = replace(make_worker(), prefilling=(in_flight("f", 4096),))
    got = policy(prefill_safety=1.0).schedule(fleet(worker, waiting=(make_waiting("a", prompt),)))
    assert [d.request_id for d in got] == admitted


def test_prefills_in_flight_count_in_the_predicted_ttft() -> None:
    busy = replace(make_worker("busy"), prefilling=(in_flight("f", 4096, tpot_slo=100.0),))
    slower = make_worker("slower", cost=replace(FAST_LINK, correction=2.0))  # 2 s for a, 4 s ahead on busy
    got = policy().schedule(fleet(busy, slower, waiting=(make_waiting("a", 1024),)))
    assert [d.worker_id for d in got] == ["slower"]


@pytest.mark.parametrize(("protect", "admitted"), [(False, []), (True, [])])
def test_a_request_lost_only_to_prefills_in_flight_stays_protected(
    protect: bool, admitted: list[str]
) -> None:
    # Own slack 5.0 s (not lost), 6.0 s in flight: over-committed, so the next prefill still waits
    # instead of the request being written off and the gate opening.
    worker = replace(
        make_worker(running=(make_running(),)), prefilling=(in_flight("f", 6144, tpot_slo=100.0),)
    )
    got = policy(protect_lost_requests=protect).schedule(fleet(worker, waiting=(make_waiting("a", 16),)))
    assert [d.request_id for d in got] == admitted


# ---- output-length prediction: running mean, max_tokens, the client's hint -----------------------
# The running request: 10 of max 100 tokens generated, 2.5 s of decode, steps 0.25 s, SLO 0.5 s.
# Predicting 90 more: slack 0.5·99 − 2.5 − 90·0.25 = 24.5 s; predicting 2 more (12 in all):
# 0.5·11 − 2.5 − 2·0.25 = 2.5 s. The newcomer's prefill is 4.0 s.


@pytest.mark.parametrize(
    ("params", "hint", "admitted"),
    [
        ({"output_prediction": "max_tokens"}, None, ["a"]),
        ({"output_prediction": "max_tokens"}, 12, []),  # the hint replaces the prediction
        ({"output_prediction": "max_tokens", "use_output_hint": False}, 12, ["a"]),
        ({}, None, ["a"]),  # the mean before any request finished: max_tokens
        ({}, 12, []),
        ({}, 500, ["a"]),  # a hint past max_tokens is capped by it
        ({"slack_gate": False}, 12, ["a"]),
    ],
)
def test_output_prediction_and_hint(params: dict[str, object], hint: int | None, admitted: list[str]) -> None:
    running = make_running("r", generated=10, max_tokens=100, decode_time=2.5, hint=hint)
    worker = make_worker(running=(running,))
    waiting = (make_waiting("a", 4096, tpot_slo=100.0),)
    got = policy(prefill_safety=1.0, **params).schedule(fleet(worker, waiting=waiting))
    assert [d.request_id for d in got] == admitted


def test_output_prediction_defaults_to_the_running_mean() -> None:
    assert LayerKVParams().output_prediction == "mean"
    assert (
        LayerKVParams().slack_gate and LayerKVParams().newcomer_tpot_check and LayerKVParams().use_output_hint
    )


@pytest.mark.parametrize(("slack_gate", "admitted"), [(True, ["a"]), (False, ["a", "b", "c"])])
def test_slack_gate_off_admits_on_placement_and_budget_only(slack_gate: bool, admitted: list[str]) -> None:
    # 5.0 s of slack: a's 4.0 s fits, b's and c's do not (gate on); off, all three go.
    worker = make_worker(running=(make_running(),))
    waiting = tuple(make_waiting(n, 4096, arrival=i, tpot_slo=100.0) for i, n in enumerate("abc"))
    got = policy(prefill_safety=1.0, slack_gate=slack_gate).schedule(fleet(worker, waiting=waiting))
    assert [d.request_id for d in got] == admitted
