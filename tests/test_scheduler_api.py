"""SchedulerService over real gRPC, real Redis and stub workers: streaming, cancel, attach,
idempotent ids, GetRequest, and the status code of every kind of bad call."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from common.proto.layerkv.v1 import admin_pb2, scheduler_pb2, types_pb2
from scheduler_svc.testing.fleet import Fleet, collect, generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens


@pytest.fixture
async def fleet(redis_url: str):
    fleet = await start_fleet(redis_url, [StubWorker("w0", step_s=0.003), StubWorker("w1", step_s=0.003)])
    yield fleet
    await fleet.close()


async def expect_status(call, code: grpc.StatusCode) -> str:
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as err:
        assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
        assert err.details(), "every error status carries a message"
        return err.details()
    raise AssertionError(f"expected {code}, the call succeeded")


async def test_generate_streams_token_ids_and_text(fleet: Fleet) -> None:
    prompt = [5, 6, 7, 8]
    stream = fleet.client.Generate(generate_request(prompt, 12))
    chunks = []
    final = None
    async for response in stream:
        assert response.request_id
        if response.HasField("chunk"):
            chunks.append(response.chunk)
        else:
            final = response.final
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected_tokens(prompt, 12)
    assert len(chunks) > 1, "tokens arrive as they are generated, not in one message"
    assert "".join(c.text_delta for c in chunks) == bytes(tokens).decode()  # stub tokens are ASCII bytes
    assert final is not None and final.finish_reason == types_pb2.FINISH_REASON_LENGTH
    assert (final.prompt_tokens, final.output_tokens) == (4, 12)
    assert 0 <= final.queue_s <= final.ttft_s <= final.latency_s


async def messages(
    fleet: Fleet, request: scheduler_pb2.GenerateRequest
) -> list[scheduler_pb2.GenerateResponse]:
    return [response async for response in fleet.client.Generate(request)]


@pytest.mark.parametrize("max_tokens", [1, 12])
async def test_with_final_with_tokens_the_last_tokens_ride_in_the_final(
    fleet: Fleet, max_tokens: int
) -> None:
    prompt = [5, 6, 7, 8]
    request = generate_request(prompt, max_tokens)
    request.final_with_tokens = True
    out = await messages(fleet, request)
    *chunks, last = out
    assert all(m.HasField("chunk") for m in chunks) and last.HasField("final")
    final = last.final
    assert final.HasField("last_chunk") and final.last_chunk.token_ids
    pieces = [m.chunk for m in chunks] + [final.last_chunk]
    starts = [sum(len(q.token_ids) for q in pieces[:i]) for i in range(len(pieces))]
    assert [p.offset for p in pieces] == starts
    tokens = [t for p in pieces for t in p.token_ids]
    assert tokens == expected_tokens(prompt, max_tokens)
    assert "".join(p.text_delta for p in pieces) == bytes(tokens).decode()
    assert (final.output_tokens, final.finish_reason) == (max_tokens, types_pb2.FINISH_REASON_LENGTH)
    if max_tokens == 1:
        assert len(out) == 1  # a one-commit request is one message
    # Without the flag (older clients) every token comes in a chunk and the final carries none.
    plain = await messages(fleet, generate_request(prompt, max_tokens))
    assert plain[-1].HasField("final") and not plain[-1].final.HasField("last_chunk")
    assert [t for m in plain[:-1] for t in m.chunk.token_ids] == tokens


@pytest.mark.parametrize("max_tokens", [1, 5])
async def test_remote_generate_reads_the_tokens_that_ride_in_the_final(fleet: Fleet, max_tokens: int) -> None:
    import io

    from layerkv.remote_generate import RemoteOptions, _request, generate_remote

    assert _request("hi", RemoteOptions()).final_with_tokens  # it asks for them there
    prompts = ["hi", "héllo"]
    out = io.StringIO()
    results = await generate_remote(fleet.address, prompts, RemoteOptions(max_tokens=max_tokens), False, out)
    tokenizer = fleet.workers[0].tokenizer
    for prompt, result in zip(prompts, results, strict=True):
        want = expected_tokens(tokenizer.encode(prompt), max_tokens)
        assert result.token_ids == want  # the last ones came in GenerateFinal.last_chunk
        assert result.text == bytes(want).decode() and result.finish_reason == "length"
    assert out.getvalue() == "".join(r.text + "\n" for r in results)


async def test_text_prompt_is_tokenized_with_the_workers_tokenizer(fleet: Fleet) -> None:
    request = scheduler_pb2.GenerateRequest(text="hé", sampling=types_pb2.SamplingParams(max_tokens=3))
    tokens, final = await collect(fleet.client.Generate(request))
    prompt = fleet.workers[0].tokenizer.encode("hé")  # BOS + UTF-8 bytes
    assert final.prompt_tokens == len(prompt) == 4
    assert tokens == expected_tokens(prompt, 3)


async def test_many_concurrent_requests_complete_over_two_workers(fleet: Fleet) -> None:
    prompts = [[i % 200 + 1] * (3 + i % 9) for i in range(60)]
    results = await asyncio.gather(*(collect(fleet.client.Generate(generate_request(p, 6))) for p in prompts))
    for prompt, (tokens, final) in zip(prompts, results, strict=True):
        assert tokens == expected_tokens(prompt, 6)
        assert final.finish_reason == types_pb2.FINISH_REASON_LENGTH
    assert fleet.workers[0].dispatched and fleet.workers[1].dispatched, "both workers get work"


async def test_get_request_reports_status_and_timings(fleet: Fleet) -> None:
    tokens, _ = await collect(fleet.client.Generate(generate_request([1, 2, 3], 5, request_id="req-1")))
    info = (await fleet.client.GetRequest(scheduler_pb2.GetRequestRequest(request_id="req-1"))).request
    assert info.status == scheduler_pb2.REQUEST_STATUS_FINISHED
    assert info.finish_reason == types_pb2.FINISH_REASON_LENGTH
    assert (info.prompt_tokens, info.output_tokens) == (3, len(tokens))
    assert info.worker_id in {"w0", "w1"} and info.placement == "GGGG"
    assert 0 < info.arrival_time <= info.dispatch_time <= info.first_token_time <= info.finish_time
    assert info.sampling.max_tokens == 5


async def test_cancel_mid_stream_frees_the_blocks_on_the_worker(fleet: Fleet) -> None:
    stream = fleet.client.Generate(generate_request([9] * 10, 200, request_id="long"))
    seen = 0
    async for response in stream:
        if response.HasField("chunk"):
            seen += len(response.chunk.token_ids)
            if seen >= 3:
                break
    running_on = [w for w in fleet.workers if "long@0" in w.running_ids]
    assert len(running_on) == 1
    worker = running_on[0]
    assert worker.gpu_free < worker.gpu_blocks
    cancelled = await fleet.client.Cancel(scheduler_pb2.CancelRequest(request_id="long"))
    assert cancelled.cancelled
    assert worker.running_ids == [] and worker.gpu_free == worker.gpu_blocks
    assert worker.aborted == ["long@0"]
    tokens, final = await collect(fleet.client.Attach(scheduler_pb2.AttachRequest(request_id="long")))
    assert final.finish_reason == types_pb2.FINISH_REASON_ABORT and len(tokens) < 200
    again = await fleet.client.Cancel(scheduler_pb2.CancelRequest(request_id="long"))
    assert not again.cancelled  # already finished


async def test_attach_after_disconnect_resumes_without_loss_or_repeat(fleet: Fleet) -> None:
    prompt = [3, 1, 4, 1, 5]
    received: list[int] = []
    call = fleet.client.Generate(generate_request(prompt, 40, request_id="resume-me"))
    async for response in call:
        if response.HasField("chunk"):
            received.extend(response.chunk.token_ids)
            if len(received) >= 5:
                call.cancel()  # the client disconnects mid-stream
                break
    await asyncio.sleep(0.03)  # the request keeps running meanwhile
    rest, final = [], None
    attach = fleet.client.Attach(scheduler_pb2.AttachRequest(request_id="resume-me", offset=len(received)))
    async for response in attach:
        if response.HasField("chunk"):
            assert response.chunk.offset == len(received) + len(rest)
            rest.extend(response.chunk.token_ids)
        else:
            final = response.final
    assert received + rest == expected_tokens(prompt, 40)
    assert final is not None and final.output_tokens == 40


async def test_a_retry_with_the_same_id_does_not_run_twice(fleet: Fleet) -> None:
    prompt = [7, 7, 7]
    first, second = await asyncio.gather(
        collect(fleet.client.Generate(generate_request(prompt, 8, request_id="idem"))),
        collect(fleet.client.Generate(generate_request(prompt, 8, request_id="idem"))),
    )
    third = await collect(fleet.client.Generate(generate_request(prompt, 8, request_id="idem")))
    assert first[0] == second[0] == third[0] == expected_tokens(prompt, 8)
    dispatched = [rid for w in fleet.workers for rid in w.dispatched if rid.startswith("idem@")]
    assert dispatched == ["idem@0"]


async def test_bad_input_is_invalid_argument_and_disturbs_nothing(fleet: Fleet) -> None:
    gen = fleet.client.Generate
    details = await expect_status(lambda: gen(generate_request([], 4)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "empty" in details
    empty_text = scheduler_pb2.GenerateRequest(text="", sampling=types_pb2.SamplingParams(max_tokens=2))
    await expect_status(lambda: gen(empty_text), grpc.StatusCode.INVALID_ARGUMENT)
    too_long = generate_request([1] * 4000, 200)
    assert "longest" in await expect_status(lambda: gen(too_long), grpc.StatusCode.INVALID_ARGUMENT)
    for sampling in (
        types_pb2.SamplingParams(max_tokens=4, temperature=-1.0),
        types_pb2.SamplingParams(max_tokens=4, top_p=1.5),
        types_pb2.SamplingParams(max_tokens=4, temperature=float("nan")),
    ):
        bad = scheduler_pb2.GenerateRequest(token_ids=scheduler_pb2.TokenIds(ids=[1]), sampling=sampling)
        await expect_status(lambda bad=bad: gen(bad), grpc.StatusCode.INVALID_ARGUMENT)
    bad_slo = generate_request([1], 2)
    bad_slo.slo.tpot_s = -1
    await expect_status(lambda: gen(bad_slo), grpc.StatusCode.INVALID_ARGUMENT)
    await expect_status(
        lambda: gen(generate_request([1], 2, request_id="no spaces")), grpc.StatusCode.INVALID_ARGUMENT
    )
    # nothing else was disturbed: a good request still runs
    tokens, _ = await collect(gen(generate_request([2, 2], 3)))
    assert tokens == expected_tokens([2, 2], 3)


async def test_unknown_ids_and_policies_are_not_found(fleet: Fleet) -> None:
    c = fleet.client
    await expect_status(
        lambda: c.GetRequest(scheduler_pb2.GetRequestRequest(request_id="nope")), grpc.StatusCode.NOT_FOUND
    )
    await expect_status(
        lambda: c.Cancel(scheduler_pb2.CancelRequest(request_id="nope")), grpc.StatusCode.NOT_FOUND
    )
    await expect_status(
        lambda: c.Attach(scheduler_pb2.AttachRequest(request_id="nope")), grpc.StatusCode.NOT_FOUND
    )
    spec = admin_pb2.PolicySpec(name="no-such-policy")
    details = await expect_status(
        lambda: fleet.admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=spec)), grpc.StatusCode.NOT_FOUND
    )
    assert "fcfs-full" in details  # the message lists the known ones
    bad = admin_pb2.PolicySpec(name="least-loaded")
    bad.params.update({"no_such_param": 1})
    await expect_status(
        lambda: fleet.admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=bad)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    current = await fleet.admin.GetPolicy(admin_pb2.GetPolicyRequest())
    assert current.policy.name == "fcfs-full"  # the failed swaps changed nothing
    await expect_status(
        lambda: fleet.admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="ghost")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_queue_limit_is_resource_exhausted(redis_url: str) -> None:
    # One small worker: the first request holds every GPU block, so the others wait in the queue.
    worker = StubWorker("w0", gpu_blocks=4 * 4, step_s=0.02)
    fleet = await start_fleet(redis_url, [worker], queue_limit=2)
    try:
        first = asyncio.ensure_future(collect(fleet.client.Generate(generate_request([1] * 4, 12))))
        while not worker.running_ids:
            await asyncio.sleep(0.005)
        waiting = [
            asyncio.ensure_future(collect(fleet.client.Generate(generate_request([2] * 4, 12))))
            for _ in range(2)
        ]
        while len(fleet.server.core.queue) < 2:
            await asyncio.sleep(0.005)
        assert worker.running_ids == [worker.dispatched[0]]  # the others wait: no room
        details = await expect_status(
            lambda: fleet.client.Generate(generate_request([3] * 4, 12)), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert "queue" in details
        for result in await asyncio.gather(first, *waiting):  # the accepted ones all finish
            assert len(result[0]) == 12
    finally:
        await fleet.close()


async def test_no_healthy_worker_is_unavailable(redis_url: str) -> None:
    worker = StubWorker("w0")
    fleet = await start_fleet(redis_url, [worker])
    try:
        await worker.stop()
        for _ in range(200):
            if not any(h.healthy for h in fleet.server.core.pool.handles()):
                break
            await asyncio.sleep(0.01)
        await expect_status(
            lambda: fleet.client.Generate(generate_request([1], 2)), grpc.StatusCode.UNAVAILABLE
        )
    finally:
        await fleet.close()


async def test_health_and_reflection_are_served(fleet: Fleet) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(fleet.channel)
    for service in ("", "layerkv.v1.SchedulerService", "layerkv.v1.AdminService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(fleet.channel)
    call = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for resp in call:
        names |= {s.name for s in resp.list_services_response.service}
    assert {"layerkv.v1.SchedulerService", "layerkv.v1.AdminService", "grpc.health.v1.Health"} <= names


async def test_a_refused_dispatch_keeps_the_request_queueing(redis_url: str) -> None:
    # The worker refuses the first dispatch after 0.5 s (its books were fuller than the ledger
    # thought): the request is requeued, runs on the next try, and its queueing time runs until a
    # worker actually took it, not until the refused attempt.
    worker = StubWorker("w0", refuse_next=1, refuse_delay_s=0.5)
    fleet = await start_fleet(redis_url, [worker])
    try:
        tokens, final = await collect(fleet.client.Generate(generate_request([1, 2, 3], 4)))
        assert tokens == expected_tokens([1, 2, 3], 4)
        assert worker.refused == 1 and len(worker.dispatched) == 1
        assert final.queue_s >= 0.5
    finally:
        await fleet.close()


async def test_an_id_known_only_to_redis_attaches_whatever_the_retry_carries(fleet: Fleet) -> None:
    """Admission reads no Redis before admitting: the create answers "exists", and a retry that
    fails a check looks there before it is refused, so both attach to the first run."""
    tokens, _ = await collect(fleet.client.Generate(generate_request([4, 5, 6], 6, request_id="kept")))
    lifecycle = fleet.server.core.lifecycle
    lifecycle.requests.pop("kept")  # evicted from memory, as after 10,000 newer finished requests
    again, final = await collect(fleet.client.Generate(generate_request([9, 9], 3, request_id="kept")))
    assert again == tokens == expected_tokens([4, 5, 6], 6) and final.prompt_tokens == 3
    lifecycle.requests.pop("kept", None)
    empty = scheduler_pb2.GenerateRequest(request_id="kept", sampling=types_pb2.SamplingParams(max_tokens=3))
    again, final = await collect(fleet.client.Generate(empty))  # no prompt at all: still the first run
    assert again == tokens and final.output_tokens == 6
    unknown = scheduler_pb2.GenerateRequest(request_id="never-seen", sampling=types_pb2.SamplingParams())
    details = await expect_status(lambda: fleet.client.Generate(unknown), grpc.StatusCode.INVALID_ARGUMENT)
    assert "prompt" in details
