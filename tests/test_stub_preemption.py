"""The stub worker on the on-demand model (growth at block boundaries, recompute and swap-layers
preemption, reported as the engine reports them), and the scheduler's ``vllm`` policy driving it
over real gRPC: tokens unchanged by preemption, preemptions counted, the ledger empty at the end."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from common.errors import ResourceExhausted
from common.proto.layerkv.v1 import types_pb2, worker_pb2
from scheduler_svc.testing.fleet import collect, generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens

# The stub geometry: 4 layers, 4-token blocks.


def dispatch(rid: str, prompt: list[int], max_tokens: int, preemption: str = "", letters: str = "GGGG"):
    return worker_pb2.DispatchRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=types_pb2.SamplingParams(max_tokens=max_tokens),
        placement=letters,
        preemption=preemption,
    )


Events = list[worker_pb2.StreamEventsResponse]


def tokens_of(events: Events) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for event in events:
        for u in event.tokens:
            tokens.setdefault(u.request_id, []).extend(u.token_ids)
    return tokens


def run_to_end(stub: StubWorker, steps: int = 200) -> Events:
    events = []
    for _ in range(steps):
        if not (stub.running_ids or stub.waiting_ids):
            break
        events.append(stub.step())
    return events


async def test_decode_grows_one_block_per_layer_at_each_boundary() -> None:
    stub = StubWorker("w", gpu_blocks=64)
    await stub.Dispatch(dispatch("a", [3, 1, 4, 1], 12), None)  # type: ignore[arg-type]
    assert stub.used().gpu_per_layer == (1,) * 4  # the prompt's block only, not prompt + max_tokens
    per_step = [stub.step().gpu.used_blocks_per_layer[0] for _ in range(12)]
    # step k stores token k - 1 of the output: 4 prompt tokens + (k - 1) in ceil(/ 4) blocks
    assert per_step == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 0]  # the last step finishes and frees it
    assert stub.preempted == []


async def test_recompute_preempts_the_newest_and_readmits_it_ahead_of_new_dispatches() -> None:
    # 12 GPU blocks: 3 per layer. Two prompts of 4 tokens (1 block each) grow until they collide.
    stub = StubWorker("w", gpu_blocks=12, host_blocks=0)
    await stub.Dispatch(dispatch("old", [1, 2, 3, 4], 8), None)  # type: ignore[arg-type]
    await stub.Dispatch(dispatch("new", [5, 6, 7, 8], 8), None)  # type: ignore[arg-type]
    events = [stub.step() for _ in range(6)]
    preempting = next(e for e in events if e.step.num_preemptions)
    assert list(preempting.preempted_request_ids) == ["new"]
    assert list(preempting.waiting_request_ids) == ["new"]
    assert [r.request_id for r in preempting.running] == ["old"]
    assert stub.waiting_ids == ["new"]
    with pytest.raises(ResourceExhausted, match="preempted waiting"):  # it goes first
        await stub.Dispatch(dispatch("late", [9], 4), None)  # type: ignore[arg-type]
    rest = run_to_end(stub)
    tokens = tokens_of(events + rest)
    assert tokens["old"] == expected_tokens([1, 2, 3, 4], 8)
    assert tokens["new"] == expected_tokens([5, 6, 7, 8], 8)  # recompute changed no token
    assert any(e.step.kind in ("mixed", "prefill") and e.step.num_prefill_tokens > 4 for e in rest)
    assert stub.used().gpu_blocks == 0


async def test_swap_layers_moves_gpu_layers_to_the_host_and_keeps_decoding() -> None:
    stub = StubWorker("w", gpu_blocks=12, host_blocks=64)
    await stub.Dispatch(dispatch("old", [1, 2, 3, 4], 8, "swap-layers"), None)  # type: ignore[arg-type]
    await stub.Dispatch(dispatch("new", [5, 6, 7, 8], 8, "swap-layers"), None)  # type: ignore[arg-type]
    events = run_to_end(stub)
    tokens = tokens_of(events)
    swapped = [e for e in events if e.step.num_swapped_layers]
    assert swapped and all(not e.preempted_request_ids and not e.waiting_request_ids for e in events)
    letters = {r.request_id: r.placement for r in swapped[0].running}
    assert "H" in letters["new"] and letters["old"] == "GGGG"  # the newest gave up GPU layers
    assert tokens["old"] == expected_tokens([1, 2, 3, 4], 8)
    assert tokens["new"] == expected_tokens([5, 6, 7, 8], 8)


async def test_vllm_policy_preempts_and_every_token_survives(redis_url: str) -> None:
    # 16 GPU blocks: 4 per layer, 16 tokens. vLLM's rule admits three 4-token prompts at once (one
    # block each); growing to 4 + 10 tokens they collide and the worker preempts by recompute.
    worker = StubWorker("w0", gpu_blocks=16, host_blocks=0, step_s=0.003)
    fleet = await start_fleet(redis_url, [worker], policy="vllm")
    try:
        prompts = [[i + 1] * 4 for i in range(3)]
        results = await asyncio.gather(
            *(collect(fleet.client.Generate(generate_request(p, 10))) for p in prompts)
        )
        for prompt, (tokens, final) in zip(prompts, results, strict=True):
            assert tokens == expected_tokens(prompt, 10)
            assert final.finish_reason == types_pb2.FINISH_REASON_LENGTH
        assert worker.preempted  # growth collided: vLLM's rule overcommits on purpose
        assert set(worker.modes.values()) == {"recompute"}
        core = fleet.server.core
        counted = core.metrics.registry.get_sample_value("layerkv_preemptions_total", {"worker": "w0"})
        assert counted == len(worker.preempted)
        budget = core.ledger.get("w0")
        for _ in range(200):  # the heartbeat after the last step
            if budget is not None and not budget.holdings and budget.gpu.free_blocks == 16:
                break
            await asyncio.sleep(0.01)
        assert budget is not None and budget.holdings == {} and budget.gpu_free == 16
        assert budget.preemptions == len(worker.preempted)
    finally:
        await fleet.close()


async def test_fcfs_full_reserves_whole_requests_and_never_preempts(redis_url: str) -> None:
    worker = StubWorker("w0", gpu_blocks=16, host_blocks=0, step_s=0.003)
    fleet = await start_fleet(redis_url, [worker], policy="fcfs-full")
    try:
        prompts = [[i + 1] * 4 for i in range(3)]
        results = await asyncio.gather(
            *(collect(fleet.client.Generate(generate_request(p, 10))) for p in prompts)
        )
        assert [t for t, _ in results] == [expected_tokens(p, 10) for p in prompts]
        assert worker.preempted == []  # 4 + 10 tokens need all 16 blocks: one request at a time
        assert set(worker.modes.values()) == {"recompute"}
    finally:
        await fleet.close()


async def test_layerkv_policy_swaps_layers_and_every_token_survives(redis_url: str) -> None:
    # No headroom (vLLM's rule) and a GPU tier of 4 blocks per layer; a link too slow to hide any
    # offload, so the paper's rule keeps every layer on the GPU. Growth collides, and the worker
    # swaps GPU layers of the newest request to the host instead of dropping it.
    worker = StubWorker("w0", gpu_blocks=16, host_blocks=256, step_s=0.003, d2h_bytes_per_s=1.0)
    params = {"headroom_blocks": 0, "default_tpot_slo_s": 10.0}
    fleet = await start_fleet(redis_url, [worker], policy="layerkv", policy_params=params)
    try:
        prompts = [[i + 1] * 4 for i in range(3)]
        results = await asyncio.gather(
            *(collect(fleet.client.Generate(generate_request(p, 10))) for p in prompts)
        )
        assert [t for t, _ in results] == [expected_tokens(p, 10) for p in prompts]
        assert set(worker.modes.values()) == {"swap-layers"}
        budget = fleet.server.core.ledger.get("w0")
        assert budget is not None and budget.preemptions == len(worker.preempted)
        assert worker.preempted and budget.swapped_layers > 0
    finally:
        await fleet.close()


async def test_dispatch_with_an_unknown_preemption_mode_is_invalid() -> None:
    stub = StubWorker("w")
    port = await stub.start()
    try:
        from common.proto.layerkv.v1 import worker_pb2_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = worker_pb2_grpc.WorkerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.Dispatch(dispatch("a", [1], 2, "drop"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "preemption" in (err.value.details() or "")
    finally:
        await stub.stop()


def test_a_step_inside_the_last_blocks_does_not_sum_the_running_requests(monkeypatch) -> None:
    """Growth that needs no block skips the sum over running requests (it made a step quadratic
    in them); the tokens and blocks stay what the full check gives."""
    from common.types import Placement
    from scheduler_svc.testing.stub_kv import StepCounts, StubKV, StubRequest
    from scheduler_svc.testing.stub_worker import STUB_GEOMETRY

    kv = StubKV(STUB_GEOMETRY, gpu_blocks=1 << 20, host_blocks=0)
    placement = Placement.from_letters("GGGG", STUB_GEOMETRY.num_layers)
    for i in range(200):
        kv.running[f"r{i}"] = StubRequest(f"r{i}", [1] * 3, 8, frozenset(), placement, "recompute", i,
                                          held_tokens=3)  # fmt: skip
    before = kv.used()
    calls = 0
    real = StubKV.used

    def counted(self: StubKV):
        nonlocal calls
        calls += 1
        return real(self)

    monkeypatch.setattr(StubKV, "used", counted)
    counts = StepCounts()
    for r in kv.running.values():
        r.context.append(2)  # the fourth token: inside the first block of every layer
        assert kv.grow(r, counts)
    assert calls == 0
    assert [r.held_tokens for r in kv.running.values()] == [4] * 200
    assert real(kv) == before and counts.preemptions == 0
