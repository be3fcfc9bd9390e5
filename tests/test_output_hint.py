"""The client's output-length hint: accepted on the gRPC and OpenAI APIs, refused when it exceeds
max_tokens, and carried as a typed field to the policy (waiting, in flight and running)."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from common.tokenizer import ByteTokenizer
from scheduler_svc.openai_api.errors import ApiError
from scheduler_svc.openai_api.models import ChatCompletionRequest, CompletionRequest
from scheduler_svc.openai_api.params import chat_job, completion_job
from scheduler_svc.policies.base import FleetSnapshot
from scheduler_svc.testing.fleet import collect, generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens


async def test_grpc_hint_reaches_the_policy_and_a_bad_one_is_refused(redis_url: str) -> None:
    # Slow steps: the request is still running when the test looks at the policy's snapshot.
    fleet = await start_fleet(redis_url, [StubWorker("w0", step_s=0.05)], policy="layerkv")
    try:
        core = fleet.server.core
        bad = generate_request([1, 2], 4)
        bad.expected_output_tokens = 5
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in fleet.client.Generate(bad):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected_output_tokens" in (err.value.details() or "")

        request = generate_request([3, 4, 5], 30, request_id="hinted")
        request.expected_output_tokens = 7
        call = asyncio.ensure_future(collect(fleet.client.Generate(request)))
        seen: set[str] = set()
        for _ in range(200):
            snap: FleetSnapshot = core.snapshot()
            for w in snap.workers:
                for r in w.running:
                    if r.request_id == "hinted":
                        assert r.expected_output_tokens == 7
                        seen.add("running")
                for f in w.prefilling:
                    if f.request_id == "hinted":
                        assert f.expected_output_tokens == 7
            for q in snap.waiting:
                assert q.request_id != "hinted" or q.expected_output_tokens == 7
            if seen:
                break
            await asyncio.sleep(0.02)
        assert seen == {"running"}
        assert core.requests["hinted"].record.expected_output_tokens == 7
        tokens, _ = await call
        assert tokens == expected_tokens([3, 4, 5], 30)  # a hint never cuts the output short

        plain = generate_request([6], 3, request_id="plain")  # no hint: None for the policy
        await collect(fleet.client.Generate(plain))
        assert core.requests["plain"].record.expected_output_tokens == 0
    finally:
        await fleet.close()


class TemplatedBytes(ByteTokenizer):
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


class Gateway:
    default_max_tokens = 16

    def tokenizer(self) -> object:
        return TemplatedBytes()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, 0),  # not given
        ({"expected_output_tokens": 12}, 12),
        ({"expected_output_tokens": 16}, 16),  # at most the max tokens (default 16)
        ({"expected_output_tokens": 17}, "expected_output_tokens"),
        ({"expected_output_tokens": 40, "max_tokens": 64}, 40),
        ({"expected_output_tokens": 0}, "expected_output_tokens"),  # 0 is not an estimate
    ],
)
def test_openai_bodies_carry_the_hint(body: dict[str, object], expected: int | str) -> None:
    for make, job_of in (
        (lambda b: CompletionRequest(prompt="hi", **b), completion_job),
        (lambda b: ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **b), chat_job),
    ):
        if isinstance(expected, str):
            with pytest.raises((ApiError, ValueError)) as err:
                job_of(make(body), Gateway())  # type: ignore[arg-type]
            assert expected in str(err.value)
        else:
            job = job_of(make(body), Gateway())  # type: ignore[arg-type]
            assert job.expected_output_tokens == expected
