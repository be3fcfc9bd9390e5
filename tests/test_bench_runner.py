"""The load generator against a fake scheduler on a real gRPC server (no fleet, no model)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import grpc
import pytest
from google.protobuf import json_format

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from layerkv.bench.runner import ClientConfig, parse_policy_params, run_workload, set_policy
from layerkv.bench.workload import BenchRequest

FIRST_TOKEN_DELAY_S = 0.05


class Refused(Exception):
    """The fake's refusal of a request (a status on Generate, a tagged error on the stream)."""


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Streams max_tokens tokens in chunks of two; prompts starting with token 0 are refused.
    Only ``Generate``: the client finds no ``GenerateStream`` and makes one call per request."""

    def __init__(self) -> None:
        self.seen: list[scheduler_pb2.GenerateRequest] = []
        self.calls: Counter[str] = Counter()

    async def _responses(
        self, request: scheduler_pb2.GenerateRequest
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        self.seen.append(request)
        if request.token_ids.ids[0] == 0:
            raise Refused("prompt refused")
        await asyncio.sleep(FIRST_TOKEN_DELAY_S)
        n = request.sampling.max_tokens
        final = scheduler_pb2.GenerateFinal(
            finish_reason=types_pb2.FINISH_REASON_LENGTH,
            prompt_tokens=len(request.token_ids.ids),
            output_tokens=n,
            queue_s=0.25,
            ttft_s=0.125,
        )
        for offset in range(0, n, 2):
            chunk = scheduler_pb2.TokenChunk(offset=offset, token_ids=list(range(offset, min(offset + 2, n))))
            if request.final_with_tokens and offset + 2 >= n:  # the last chunk rides the final
                final.last_chunk.CopyFrom(chunk)
                break
            yield scheduler_pb2.GenerateResponse(request_id=request.request_id, chunk=chunk)
            await asyncio.sleep(0.001)
        yield scheduler_pb2.GenerateResponse(request_id=request.request_id, final=final)

    async def Generate(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        self.calls["Generate"] += 1
        try:
            async for response in self._responses(request):
                yield response
        except Refused as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class StreamingFakeScheduler(FakeScheduler):
    """The same answers, also on ``GenerateStream`` (each request's events tagged, as the scheduler)."""

    async def GenerateStream(
        self,
        request_iterator: AsyncIterator[scheduler_pb2.GenerateStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[scheduler_pb2.GenerateStreamResponse]:
        self.calls["GenerateStream"] += 1
        out: asyncio.Queue[scheduler_pb2.TaggedEvent] = asyncio.Queue()

        async def run(tag: int, request: scheduler_pb2.GenerateRequest) -> None:
            try:
                async for r in self._responses(request):
                    event = scheduler_pb2.TaggedEvent(tag=tag, request_id=r.request_id)
                    if r.HasField("chunk"):
                        event.chunk.CopyFrom(r.chunk)
                    else:
                        event.final.CopyFrom(r.final)
                    out.put_nowait(event)
            except Refused as exc:
                code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                out.put_nowait(
                    scheduler_pb2.TaggedEvent(
                        tag=tag, error=scheduler_pb2.StreamStatus(code=code, message=str(exc))
                    )
                )

        async def read() -> None:
            async for message in request_iterator:
                for tagged in message.requests:
                    tasks.add(asyncio.create_task(run(tagged.tag, tagged.request)))

        tasks: set[asyncio.Task[None]] = set()
        reader = asyncio.create_task(read())
        try:
            while True:
                yield scheduler_pb2.GenerateStreamResponse(events=[await out.get()])
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self) -> None:
        self.current = admin_pb2.PolicySpec(name="fcfs-full")
        self.auth: list[str] = []

    async def SetPolicy(
        self, request: admin_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetPolicyResponse:
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        self.auth.append(str(metadata.get("authorization", "")))
        previous, self.current = self.current, request.policy
        return admin_pb2.SetPolicyResponse(previous=previous, current=request.policy)


@asynccontextmanager
async def serving(sched: FakeScheduler) -> AsyncIterator[str]:
    """A gRPC server on a free port with ``sched`` as its scheduler service; yields its address."""
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(sched, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture(params=["per-call", "stream"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, FakeScheduler, FakeAdmin]]:
    server = grpc.aio.server()
    sched = StreamingFakeScheduler() if request.param == "stream" else FakeScheduler()
    admin = FakeAdmin()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(sched, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", sched, admin
    await server.stop(None)


async def test_workload_is_sent_at_its_arrival_times_and_measured(
    fake: tuple[str, FakeScheduler, FakeAdmin],
) -> None:
    endpoint, sched, _ = fake
    config = ClientConfig(endpoint=endpoint, ttft_slo_s=2.0, tpot_slo_s=0.25)
    requests = [
        BenchRequest(0, 0.0, (5, 6, 7), 5),
        BenchRequest(1, 0.1, (8, 9), 1),
        BenchRequest(2, 0.2, (0, 1), 4),  # refused by the fake
    ]
    done: list[int] = []
    results = await run_workload(config, requests, on_done=lambda r: done.append(r.index))
    assert sorted(done) == [0, 1, 2]
    assert [r.index for r in results] == [0, 1, 2]
    ok, single, refused = results
    for r, req in zip(results, requests, strict=True):
        assert r.sent_s >= req.arrival_s  # never early
        assert r.prompt_tokens == len(req.prompt_token_ids)
    assert ok.ok and ok.output_tokens == 5 and ok.queue_s == pytest.approx(0.25)
    assert ok.server_ttft_s == pytest.approx(0.125)  # the scheduler's own TTFT, from its final
    assert ok.ttft_s is not None and ok.ttft_s >= FIRST_TOKEN_DELAY_S
    assert ok.finished_s is not None and ok.first_token_s is not None and ok.finished_s >= ok.first_token_s
    assert single.ok and single.output_tokens == 1 and single.tpot_s is None
    # its one token came in the final (final_with_tokens): that is its first token's arrival
    assert single.first_token_s is not None and single.first_token_s == single.finished_s
    assert not refused.ok and refused.error == "INVALID_ARGUMENT: prompt refused"
    # What the scheduler received: greedy, EOS ignored, the SLOs, fresh unique request ids.
    first = sched.seen[0]
    assert first.sampling.ignore_eos and first.sampling.temperature == 0.0 and first.sampling.max_tokens == 5
    assert first.slo.ttft_s == pytest.approx(2.0) and first.slo.tpot_s == pytest.approx(0.25)
    assert first.final_with_tokens  # the last tokens may ride in the final message
    assert len({m.request_id for m in sched.seen}) == 3
    again = await run_workload(config, requests[:1])
    assert again[0].ok and sched.seen[-1].request_id != first.request_id  # a rerun never re-attaches


async def test_a_multi_request_run_makes_one_generate_stream_call() -> None:
    sched = StreamingFakeScheduler()
    async with serving(sched) as endpoint:
        config = ClientConfig(endpoint=endpoint, ttft_slo_s=2.0, tpot_slo_s=0.25)
        requests = [BenchRequest(i, 0.02 * i, (5, i + 1), 4) for i in range(6)]
        results = await run_workload(config, requests)
        assert all(r.ok and r.output_tokens == 4 for r in results)
        assert sched.calls == {"GenerateStream": 1}  # not six Generate calls
        # each request timed by its own events: its first token after its own sending
        for r in results:
            assert r.first_token_s is not None and r.first_token_s - r.sent_s >= FIRST_TOKEN_DELAY_S
        # multiplex off: one Generate call per request, the same figures
        sched.calls.clear()
        per_call = await run_workload(replace(config, multiplex=False), requests)
        assert sched.calls == {"Generate": 6}
        assert [(r.ok, r.output_tokens) for r in per_call] == [(r.ok, r.output_tokens) for r in results]


class InternalOnStream(FakeScheduler):
    """``GenerateStream`` always fails INTERNAL before answering, as grpc reports the race of an
    older scheduler's UNIMPLEMENTED with the client's first write; ``Generate`` works."""

    async def GenerateStream(
        self,
        request_iterator: AsyncIterator[scheduler_pb2.GenerateStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[scheduler_pb2.GenerateStreamResponse]:
        self.calls["GenerateStream"] += 1
        await context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")
        yield scheduler_pb2.GenerateStreamResponse()  # never reached


async def test_a_stream_failing_internal_before_any_answer_falls_back_to_a_call_each() -> None:
    sched = InternalOnStream()
    async with serving(sched) as endpoint:
        config = ClientConfig(endpoint=endpoint, ttft_slo_s=2.0, tpot_slo_s=0.25)
        results = await run_workload(config, [BenchRequest(i, 0.0, (5, i + 1), 3) for i in range(2)])
        assert [(r.ok, r.output_tokens, r.error) for r in results] == [(True, 3, "")] * 2
        assert sched.calls == {"GenerateStream": 3, "Generate": 2}  # reopened twice, then a call each


async def test_a_request_past_its_deadline_fails_and_is_cancelled(
    fake: tuple[str, FakeScheduler, FakeAdmin],
) -> None:
    endpoint, _, _ = fake
    config = ClientConfig(
        endpoint=endpoint, ttft_slo_s=2.0, tpot_slo_s=0.25, request_timeout_s=FIRST_TOKEN_DELAY_S / 5
    )
    (result,) = await run_workload(config, [BenchRequest(0, 0.0, (5, 6), 4)])
    assert not result.ok and result.error.startswith("DEADLINE_EXCEEDED")
    assert result.first_token_s is None and result.finished_s is None


async def test_set_policy_sends_name_params_and_token(fake: tuple[str, FakeScheduler, FakeAdmin]) -> None:
    endpoint, _, admin = fake
    config = ClientConfig(endpoint=endpoint, ttft_slo_s=1.0, tpot_slo_s=1.0, admin_token="s3cret")
    previous = await set_policy(config, "layerkv", {"prefill_safety": 1.5, "queue_order": "ttft-deadline"})
    assert previous == "fcfs-full"
    assert admin.current.name == "layerkv"
    assert json_format.MessageToDict(admin.current.params) == {
        "prefill_safety": 1.5,
        "queue_order": "ttft-deadline",
    }
    assert admin.auth == ["Bearer s3cret"]


def test_policy_params_parsing() -> None:
    assert parse_policy_params(['layerkv={"prefill_safety": 1.5}', "fcfs-full={}"]) == {
        "layerkv": {"prefill_safety": 1.5},
        "fcfs-full": {},
    }
    for bad in ["layerkv", "=1", "layerkv=[1]", "layerkv={bad"]:
        with pytest.raises(ValueError):
            parse_policy_params([bad])
