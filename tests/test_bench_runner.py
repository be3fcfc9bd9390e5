"""The load generator against a fake scheduler on a real gRPC server (no fleet, no model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import json_format

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from layerkv.bench.runner import ClientConfig, parse_policy_params, run_workload, set_policy
from layerkv.bench.workload import BenchRequest

FIRST_TOKEN_DELAY_S = 0.05


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Streams max_tokens tokens in chunks of two; prompts starting with token 0 are refused."""

    def __init__(self) -> None:
        self.seen: list[scheduler_pb2.GenerateRequest] = []

    async def Generate(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        self.seen.append(request)
        if request.token_ids.ids[0] == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt refused")
        await asyncio.sleep(FIRST_TOKEN_DELAY_S)
        n = request.sampling.max_tokens
        final = scheduler_pb2.GenerateFinal(
            finish_reason=types_pb2.FINISH_REASON_LENGTH,
            prompt_tokens=len(request.token_ids.ids),
            output_tokens=n,
            queue_s=0.25,
        )
        for offset in range(0, n, 2):
            chunk = scheduler_pb2.TokenChunk(offset=offset, token_ids=list(range(offset, min(offset + 2, n))))
            if request.final_with_tokens and offset + 2 >= n:  # the last chunk rides the final
                final.last_chunk.CopyFrom(chunk)
                break
            yield scheduler_pb2.GenerateResponse(request_id=request.request_id, chunk=chunk)
            await asyncio.sleep(0.001)
        yield scheduler_pb2.GenerateResponse(request_id=request.request_id, final=final)


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


@pytest.fixture
async def fake() -> AsyncIterator[tuple[str, FakeScheduler, FakeAdmin]]:
    server = grpc.aio.server()
    sched, admin = FakeScheduler(), FakeAdmin()
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
