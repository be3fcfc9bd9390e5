"""The WorkerService in-process on port 0, called through the generated stubs over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.config import WorkerSettings
from common.proto.layerkv.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from common.tokenizer import tokenizer_from_wire
from common.types import SamplingParams
from tests.fleet import make_engine, proto_sampling, reference_outputs
from tests.pki import make_pki, tls_credentials
from worker_svc.server import WorkerServer, create_server

TIMEOUT_S = 60.0


@dataclass
class Worker:
    server: WorkerServer
    stub: worker_pb2_grpc.WorkerServiceStub
    channel: grpc.aio.Channel
    engine: Any


async def _start(gpu_blocks: int = 300, host_blocks: int = 64, **settings: object) -> Worker:
    engine = make_engine(gpu_blocks=gpu_blocks, host_blocks=host_blocks)
    server, port = await create_server(
        WorkerSettings.build(host="127.0.0.1", port=0, metrics_port=0, worker_id="w-test", **settings),
        engine=engine,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Worker(server, worker_pb2_grpc.WorkerServiceStub(channel), channel, engine)


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    w = await _start()
    yield w
    await w.channel.close(None)
    await w.server.stop(0)


@dataclass
class Collected:
    """What a StreamEvents subscriber saw until the given requests finished."""

    tokens: dict[str, list[int]]
    reasons: dict[str, int]
    admitted: list[str]
    last: worker_pb2.StreamEventsResponse


async def _collect(events: AsyncIterator[worker_pb2.StreamEventsResponse], ids: set[str]) -> Collected:
    """Read events until every request in ``ids`` finished: tokens, finish reasons, admissions, last state."""
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    reasons: dict[str, int] = {}
    admitted: list[str] = []
    last = None

    async def run() -> None:
        nonlocal last
        async for ev in events:
            admitted.extend(ev.admitted_request_ids)
            for t in ev.tokens:
                if t.request_id in tokens:
                    assert t.request_id not in reasons, f"tokens after the finish of {t.request_id}"
                    tokens[t.request_id].extend(t.token_ids)
                    if t.finished:
                        reasons[t.request_id] = t.finish_reason
            last = ev
            if set(reasons) == ids:
                return

    await asyncio.wait_for(run(), TIMEOUT_S)
    assert last is not None
    return Collected(tokens, reasons, admitted, last)


async def test_describe_and_tokenizer_match_the_engine(worker: Worker) -> None:
    d = await worker.stub.Describe(worker_pb2.DescribeRequest())
    e = worker.engine
    assert d.worker_id == "w-test"
    assert d.model == e.model_name
    assert (d.geometry.num_layers, d.geometry.num_kv_heads, d.geometry.head_dim, d.geometry.block_size) == (
        4,
        2,
        32,
        16,
    )
    assert (d.gpu_blocks, d.host_blocks) == (300, 64)
    assert d.max_model_len == e.max_model_len
    assert d.eos_token_id == e.eos_token_id
    assert d.cost_model.d2h_bytes_per_s > 0
    tok = await worker.stub.GetTokenizer(worker_pb2.GetTokenizerRequest())
    remote = tokenizer_from_wire(tok.kind, tok.tokenizer_json)
    assert remote.encode("héllo") == e.tokenizer.encode("héllo")


async def test_dispatched_requests_stream_the_engines_tokens_and_free_their_blocks(worker: Worker) -> None:
    prompts = [
        [256, 72, 105],
        [256, *b"layer-wise"],
        [256, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    ]
    events = worker.stub.StreamEvents(worker_pb2.StreamEventsRequest())
    first = await anext(events.__aiter__())
    assert first.gpu.total_blocks == 300 and first.gpu.free_blocks == 300  # the current state comes first
    ids = {f"r{i}" for i in range(len(prompts))}
    placements = ["GGGG", "GHGH", ""]  # explicit all-GPU, host layers, and the engine's default rule
    for i, prompt in enumerate(prompts):
        reply = await worker.stub.Dispatch(
            worker_pb2.DispatchRequest(
                request_id=f"r{i}",
                prompt_token_ids=prompt,
                sampling=proto_sampling(12),
                placement=placements[i],
            )
        )
        per_layer = -(-len(prompt) // 16)
        assert reply.gpu_blocks + reply.host_blocks == 4 * per_layer  # the prompt only: output grows
        if placements[i]:
            assert reply.host_blocks == per_layer * placements[i].count("H")
    got = await _collect(events, ids)
    events.cancel()
    want = reference_outputs(make_engine(), prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [got.tokens[f"r{i}"] for i in range(3)] == want
    assert set(got.reasons.values()) == {types_pb2.FINISH_REASON_LENGTH}
    assert sorted(got.admitted) == sorted(ids)
    last = got.last
    assert last.gpu.free_blocks == 300 and last.host.free_blocks == 64
    assert list(last.gpu.used_blocks_per_layer) == [0, 0, 0, 0]


async def test_a_full_worker_refuses_and_abort_frees_the_blocks(worker: Worker) -> None:
    events = worker.stub.StreamEvents(worker_pb2.StreamEventsRequest())
    it = events.__aiter__()
    await anext(it)
    long_prompt = [256] + [1 + i % 200 for i in range(599)]  # 600 tokens: 38 blocks per layer
    big = worker_pb2.DispatchRequest(
        request_id="big",
        prompt_token_ids=long_prompt,
        sampling=proto_sampling(1000),
        placement="GGGG",
    )
    reply = await worker.stub.Dispatch(big)
    assert (reply.gpu_blocks, reply.host_blocks) == (4 * 38, 0)
    # Wait until it is running (decoding 1000 tokens takes far longer than the next two calls).
    while True:
        ev = await asyncio.wait_for(anext(it), TIMEOUT_S)
        if any(t.request_id == "big" for t in ev.tokens):
            assert ev.gpu.free_blocks == 300 - 152
            break
    second = worker_pb2.DispatchRequest(
        request_id="second",
        prompt_token_ids=long_prompt,
        sampling=proto_sampling(1000),
        placement="GGGG",
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await worker.stub.Dispatch(second)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no room" in (refused.value.details() or "")

    assert (await worker.stub.Abort(worker_pb2.AbortRequest(request_id="big"))).aborted
    assert not (await worker.stub.Abort(worker_pb2.AbortRequest(request_id="big"))).aborted  # already gone
    while True:
        ev = await asyncio.wait_for(anext(it), TIMEOUT_S)
        done = [t for t in ev.tokens if t.request_id == "big" and t.finished]
        if done:
            assert done[0].finish_reason == types_pb2.FINISH_REASON_ABORT
            assert ev.gpu.free_blocks == 300
            assert list(ev.gpu.used_blocks_per_layer) == [0, 0, 0, 0]
            break
    # The refused request fits now, and was never half-admitted.
    reply = await worker.stub.Dispatch(second)
    assert reply.gpu_blocks == 152
    assert (await worker.stub.Abort(worker_pb2.AbortRequest(request_id="second"))).aborted
    refused_metric = worker.server.metrics.registry.get_sample_value(
        "layerkv_worker_dispatches_refused_total", {"worker": "w-test"}
    )
    assert refused_metric == 1.0
    events.cancel()


async def test_bad_input_gets_invalid_argument_and_disturbs_nothing(worker: Worker) -> None:
    ok = [256, 1, 2]

    async def status(req: worker_pb2.DispatchRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await worker.stub.Dispatch(req)
        return err.value.code(), err.value.details() or ""

    cases = [
        worker_pb2.DispatchRequest(request_id="a", prompt_token_ids=[], sampling=proto_sampling(4)),
        worker_pb2.DispatchRequest(request_id="", prompt_token_ids=ok, sampling=proto_sampling(4)),
        worker_pb2.DispatchRequest(request_id="a", prompt_token_ids=[999], sampling=proto_sampling(4)),
        worker_pb2.DispatchRequest(
            request_id="a", prompt_token_ids=ok, sampling=proto_sampling(4, temperature=-1)
        ),
        worker_pb2.DispatchRequest(
            request_id="a", prompt_token_ids=ok, sampling=proto_sampling(4, top_p=1.5)
        ),
        worker_pb2.DispatchRequest(
            request_id="a", prompt_token_ids=ok, sampling=proto_sampling(4), placement="GX"
        ),
        worker_pb2.DispatchRequest(request_id="a", prompt_token_ids=ok, sampling=proto_sampling(4000)),
        worker_pb2.DispatchRequest(request_id="a", prompt_token_ids=ok * 800, sampling=proto_sampling(4)),
    ]
    for req in cases:
        code, details = await status(req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (req, code, details)
        assert details, "a status carries a message"
    # Nothing was taken, and the worker still serves (a long request: it is still there below).
    reply = await worker.stub.Dispatch(
        worker_pb2.DispatchRequest(
            request_id="a", prompt_token_ids=ok, sampling=proto_sampling(1000), placement="GGGG"
        )
    )
    assert reply.gpu_blocks == 4 * 1  # the prompt's block per layer: max_tokens reserves nothing
    code, _ = await status(
        worker_pb2.DispatchRequest(request_id="a", prompt_token_ids=ok, sampling=proto_sampling(4))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS  # an id the engine still holds
    assert (await worker.stub.Abort(worker_pb2.AbortRequest(request_id="a"))).aborted
    assert not (await worker.stub.Abort(worker_pb2.AbortRequest(request_id="never-seen"))).aborted


async def test_several_subscribers_see_the_same_tokens(worker: Worker) -> None:
    a = worker.stub.StreamEvents(worker_pb2.StreamEventsRequest())
    b = worker.stub.StreamEvents(worker_pb2.StreamEventsRequest())
    await anext(a.__aiter__())
    await anext(b.__aiter__())
    # Both got their first (state) event: both are subscribed on the server.
    await worker.stub.Dispatch(
        worker_pb2.DispatchRequest(
            request_id="x", prompt_token_ids=[256, 5, 6], sampling=proto_sampling(8), placement="GGGG"
        )
    )
    got_a, got_b = await asyncio.gather(_collect(a, {"x"}), _collect(b, {"x"}))
    assert got_a.tokens == got_b.tokens
    assert len(got_a.tokens["x"]) == 8
    a.cancel()
    b.cancel()


async def test_events_without_a_subscriber_reach_the_next_one(worker: Worker) -> None:
    await worker.stub.Dispatch(
        worker_pb2.DispatchRequest(
            request_id="y", prompt_token_ids=[256, 9, 9, 9], sampling=proto_sampling(6), placement="GGGG"
        )
    )
    # Let it finish while nobody listens (a scheduler restarting).
    for _ in range(600):
        state = worker.server.servicer.hub.state
        if not state.running and state.gpu.free_blocks == 300:
            break
        await asyncio.sleep(0.05)
    events = worker.stub.StreamEvents(worker_pb2.StreamEventsRequest())
    got = await _collect(events, {"y"})
    events.cancel()
    want = reference_outputs(make_engine(), [[256, 9, 9, 9]], SamplingParams(max_tokens=6, ignore_eos=True))
    assert got.tokens["y"] == want[0]
    assert got.admitted == ["y"]


async def test_an_idle_subscriber_gets_the_state_as_a_heartbeat(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker_svc.service

    monkeypatch.setattr(worker_svc.service, "HEARTBEAT_S", 0.05)
    events = worker.stub.StreamEvents(worker_pb2.StreamEventsRequest())
    seen = []
    async for ev in events:  # the current state, then one heartbeat per HEARTBEAT_S while idle
        seen.append(ev)
        if len(seen) == 4:
            break
    events.cancel()
    assert all(ev.step.kind == "idle" and not ev.tokens for ev in seen)
    assert seen[-1].gpu.total_blocks == worker.engine.usage().gpu.total_blocks


async def test_health_and_reflection(worker: Worker) -> None:
    health = health_pb2_grpc.HealthStub(worker.channel)
    for service in ("", "layerkv.v1.WorkerService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(worker.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: list[str] = []
    async for reply in refl.ServerReflectionInfo(requests()):
        names = [s.name for s in reply.list_services_response.service]
    assert "layerkv.v1.WorkerService" in names and "grpc.health.v1.Health" in names


async def test_mutual_tls_admits_only_the_scheduler(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    w = await _start(
        tls_cert=pki.worker.cert, tls_key=pki.worker.key, tls_ca=pki.ca, scheduler_identity="scheduler"
    )
    await w.channel.close(None)
    address = f"127.0.0.1:{w.server.port}"
    req = worker_pb2.DispatchRequest(
        request_id="m", prompt_token_ids=[256, 1], sampling=proto_sampling(2), placement="GGGG"
    )
    try:
        async with grpc.aio.secure_channel(address, tls_credentials(pki.ca, pki.scheduler)) as ch:
            stub = worker_pb2_grpc.WorkerServiceStub(ch)
            assert (await stub.Dispatch(req)).gpu_blocks == 4
        # Same CA, another name: authenticated but not the scheduler.
        async with grpc.aio.secure_channel(address, tls_credentials(pki.ca, pki.intruder)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await worker_pb2_grpc.WorkerServiceStub(ch).Dispatch(req)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Right name, wrong CA; and no client certificate at all: the handshake fails.
        for creds in (tls_credentials(pki.ca, pki.rogue), tls_credentials(pki.ca)):
            async with grpc.aio.secure_channel(address, creds) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await worker_pb2_grpc.WorkerServiceStub(ch).Describe(
                        worker_pb2.DescribeRequest(), timeout=5
                    )
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(address) as ch:  # plaintext
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await worker_pb2_grpc.WorkerServiceStub(ch).Describe(worker_pb2.DescribeRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await w.server.stop(0)


async def test_an_engine_failure_makes_the_worker_unhealthy_and_unavailable(worker: Worker) -> None:
    def broken_step() -> None:
        raise RuntimeError("simulated device fault")

    events = worker.stub.StreamEvents(worker_pb2.StreamEventsRequest())
    await anext(events.__aiter__())

    worker.engine.step = broken_step  # fault injection: the next step raises
    await worker.stub.Dispatch(
        worker_pb2.DispatchRequest(
            request_id="doomed", prompt_token_ids=[256, 1], sampling=proto_sampling(4), placement="GGGG"
        )
    )
    health = health_pb2_grpc.HealthStub(worker.channel)
    for _ in range(200):
        reply = await health.Check(health_pb2.HealthCheckRequest(service="layerkv.v1.WorkerService"))
        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.02)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker.stub.Dispatch(
            worker_pb2.DispatchRequest(
                request_id="next", prompt_token_ids=[256, 1], sampling=proto_sampling(4)
            )
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "simulated device fault" in (err.value.details() or "")
    # The event stream ended (the scheduler's cue to requeue), and a new one is refused.
    assert [ev async for ev in events if ev.tokens] == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in worker.stub.StreamEvents(worker_pb2.StreamEventsRequest()):
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_dispatch_batch_answers_each_request_as_dispatch_would(worker: Worker) -> None:
    events = worker.stub.StreamEvents(worker_pb2.StreamEventsRequest())
    await anext(events.__aiter__())
    prompts = [[256, 72, 105], [256, *b"batch"]]
    long_prompt = [256] + [1 + i % 200 for i in range(599)]  # 38 blocks a layer: one fits, two do not

    def req(rid: str, prompt: list[int], placement: str = "GGGG") -> worker_pb2.DispatchRequest:
        return worker_pb2.DispatchRequest(request_id=rid, prompt_token_ids=prompt, sampling=proto_sampling(6),
                                          placement=placement)  # fmt: skip

    reply = await worker.stub.DispatchBatch(worker_pb2.DispatchBatchRequest(requests=[
        req("a", prompts[0]),
        req("empty", []),
        req("big", long_prompt),
        req("big2", long_prompt),
        req("a", prompts[0]),
        req("b", prompts[1], "GHGH"),
    ]))  # fmt: skip
    s = worker_pb2
    assert [r.status for r in reply.results] == [
        s.DISPATCH_STATUS_ACCEPTED, s.DISPATCH_STATUS_REJECTED, s.DISPATCH_STATUS_ACCEPTED,
        s.DISPATCH_STATUS_REFUSED, s.DISPATCH_STATUS_FAILED, s.DISPATCH_STATUS_ACCEPTED,
    ]  # fmt: skip
    assert "empty prompt" in reply.results[1].message and "no room" in reply.results[3].message
    assert reply.results[4].message.startswith("ALREADY_EXISTS")
    assert (reply.results[2].gpu_blocks, reply.results[2].host_blocks) == (4 * 38, 0)
    assert (reply.results[5].gpu_blocks, reply.results[5].host_blocks) == (2, 2)
    got = await _collect(events, {"a", "b", "big"})
    events.cancel()
    want = reference_outputs(make_engine(), [prompts[0], prompts[1], long_prompt],
                             SamplingParams(max_tokens=6, ignore_eos=True))  # fmt: skip
    assert [got.tokens[r] for r in ("a", "b", "big")] == want
    assert sorted(got.admitted) == ["a", "b", "big"]
    refused = worker.server.metrics.registry.get_sample_value(
        "layerkv_worker_dispatches_refused_total", {"worker": "w-test"}
    )
    assert refused == 1.0
