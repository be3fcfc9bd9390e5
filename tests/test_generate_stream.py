"""GenerateStream over real gRPC, real Redis and stub workers: many tagged requests on one stream,
coalesced events, per-request errors, cancel by tag, a broken stream, a scheduler restart, the
bearer token, and Redis state identical to Generate's."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from common.proto.layerkv.v1 import scheduler_pb2, types_pb2
from scheduler_svc.testing.fleet import Fleet, collect, generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens


@pytest.fixture
async def fleet(redis_url: str):
    fleet = await start_fleet(redis_url, [StubWorker("w0", step_s=0.003), StubWorker("w1", step_s=0.003)])
    yield fleet
    await fleet.close()


@dataclass
class Tagged:
    """What the client saw of one tag."""

    request_id: str = ""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    final: Any = None
    error: Any = None

    def take(self, event: scheduler_pb2.TaggedEvent) -> None:
        assert self.final is None and self.error is None, "nothing follows a final or an error"
        self.request_id = event.request_id or self.request_id
        kind = event.WhichOneof("event")
        chunks = [event.chunk] if kind == "chunk" else []
        if kind == "final":
            self.final = event.final
            if event.final.HasField("last_chunk"):
                chunks.append(event.final.last_chunk)
        elif kind == "error":
            self.error = event.error
        for chunk in chunks:
            assert chunk.offset == len(self.tokens), "no token lost or repeated"
            self.tokens.extend(chunk.token_ids)
            self.text += chunk.text_delta


def submit(*tagged: tuple[int, scheduler_pb2.GenerateRequest]) -> scheduler_pb2.GenerateStreamRequest:
    return scheduler_pb2.GenerateStreamRequest(
        requests=[scheduler_pb2.TaggedGenerateRequest(tag=t, request=r) for t, r in tagged]
    )


async def read_all(call: Any, into: dict[int, Tagged], sizes: list[int] | None = None) -> None:
    # read(), not ``async for``: grpc refuses both on one call, and some tests read() first
    while (response := await call.read()) is not grpc.aio.EOF:
        if sizes is not None:
            sizes.append(len({e.tag for e in response.events}))
        for event in response.events:
            into.setdefault(event.tag, Tagged()).take(event)


async def until(condition, describe, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {describe()}"
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("final_with_tokens", [False, True])
async def test_many_requests_on_one_stream_complete_with_their_tags(
    fleet: Fleet, final_with_tokens: bool
) -> None:
    prompts = {tag: [tag % 200 + 1] * (3 + tag % 7) for tag in range(1, 81)}
    requests = {}
    for tag, prompt in prompts.items():
        requests[tag] = generate_request(prompt, 1 + tag % 6)
        requests[tag].final_with_tokens = final_with_tokens
    call = fleet.client.GenerateStream()
    tags = list(prompts)
    for half in (tags[:40], tags[40:]):  # two messages of 40 requests each
        await call.write(submit(*((t, requests[t]) for t in half)))
    await call.done_writing()
    seen: dict[int, Tagged] = {}
    sizes: list[int] = []
    await asyncio.wait_for(read_all(call, seen, sizes), 30)  # ends once every tag has its final
    assert sorted(seen) == tags
    ids = {seen[t].request_id for t in tags}
    assert len(ids) == len(tags) and "" not in ids  # each its own scheduler-chosen id
    for tag, prompt in prompts.items():
        got = seen[tag]
        want = expected_tokens(prompt, 1 + tag % 6)
        assert got.error is None and got.tokens == want, tag
        assert got.text == bytes(want).decode()
        assert got.final.finish_reason == types_pb2.FINISH_REASON_LENGTH
        assert (got.final.prompt_tokens, got.final.output_tokens) == (len(prompt), len(want))
    assert max(sizes) > 1, "one response carries events of several requests"
    assert fleet.workers[0].dispatched and fleet.workers[1].dispatched


async def test_a_bad_request_gets_its_own_status_and_the_others_run(fleet: Fleet) -> None:
    empty = scheduler_pb2.GenerateRequest(token_ids=scheduler_pb2.TokenIds(ids=[]))
    hint = generate_request([1, 2], 3)
    hint.expected_output_tokens = 9
    bad_id = generate_request([1, 2], 3, request_id="no spaces allowed")
    call = fleet.client.GenerateStream()
    await call.write(submit(
        (1, generate_request([4, 5], 5)), (2, empty), (3, hint), (4, bad_id), (5, generate_request([6], 4)),
    ))  # fmt: skip
    await call.done_writing()
    seen: dict[int, Tagged] = {}
    await asyncio.wait_for(read_all(call, seen), 30)
    problems = {2: "prompt is empty", 3: "expected_output_tokens (9) must be at most max_tokens (3)",
                4: "request_id 'no spaces allowed' must be"}  # fmt: skip
    for tag, words in problems.items():
        error = seen[tag].error
        assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], tag
        assert words in error.message, (tag, error.message)
        assert seen[tag].final is None and seen[tag].tokens == []
    assert seen[1].tokens == expected_tokens([4, 5], 5) and seen[1].final is not None
    assert seen[5].tokens == expected_tokens([6], 4) and seen[5].final is not None


async def test_a_reused_tag_while_it_runs_is_refused_and_the_first_goes_on(fleet: Fleet) -> None:
    call = fleet.client.GenerateStream()
    await call.write(submit((7, generate_request([3] * 4, 60)), (7, generate_request([2], 2))))
    await call.done_writing()
    events: list[scheduler_pb2.TaggedEvent] = []
    async for response in call:
        events.extend(response.events)
    errors = [e for e in events if e.HasField("error")]
    assert len(errors) == 1 and "tag 7 is in use" in errors[0].error.message and not errors[0].request_id
    got = Tagged()
    for event in events:
        if not event.HasField("error"):
            got.take(event)
    assert got.tokens == expected_tokens([3] * 4, 60)


async def test_unavailable_and_queue_full_are_per_request_statuses(redis_url: str) -> None:
    worker = StubWorker("w0", step_s=0.05)
    fleet = await start_fleet(redis_url, [worker], queue_limit=1)
    try:
        call = fleet.client.GenerateStream()
        await call.write(submit(*((t, generate_request([t + 1] * 3, 40)) for t in range(4))))
        await call.done_writing()
        seen: dict[int, Tagged] = {}
        await asyncio.wait_for(read_all(call, seen), 30)
        full = [t for t, s in seen.items() if s.error is not None]
        assert full, "with a queue limit of 1 some of four requests in one message are refused"
        for tag in full:
            assert seen[tag].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "waiting queue is full" in seen[tag].error.message
        for tag in set(seen) - set(full):
            assert seen[tag].tokens == expected_tokens([tag + 1] * 3, 40)
        await worker.stop()
        await until(lambda: not any(h.healthy for h in fleet.server.core.pool.handles()), lambda: "worker up")
        call = fleet.client.GenerateStream()
        await call.write(submit((9, generate_request([1], 2))))
        await call.done_writing()
        seen = {}
        await asyncio.wait_for(read_all(call, seen), 30)
        assert seen[9].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "no healthy worker" in seen[9].error.message
    finally:
        await fleet.close()


async def test_cancel_by_tag_ends_that_request_and_frees_its_blocks(fleet: Fleet) -> None:
    call = fleet.client.GenerateStream()
    await call.write(submit((1, generate_request([9] * 10, 200, request_id="long")),
                            (2, generate_request([8] * 3, 20))))  # fmt: skip
    seen: dict[int, Tagged] = {}
    while len(seen.get(1, Tagged()).tokens) < 3:
        assert seen.get(1, Tagged()).error is None, seen[1].error
        response = await call.read()
        for event in response.events:
            seen.setdefault(event.tag, Tagged()).take(event)
    await call.write(scheduler_pb2.GenerateStreamRequest(cancel_tags=[1, 99]))  # 99: not in use
    await call.done_writing()
    await asyncio.wait_for(read_all(call, seen), 30)
    assert seen[1].final.finish_reason == types_pb2.FINISH_REASON_ABORT
    assert 3 <= len(seen[1].tokens) < 200
    assert seen[2].tokens == expected_tokens([8] * 3, 20)
    info = (await fleet.client.GetRequest(scheduler_pb2.GetRequestRequest(request_id="long"))).request
    assert info.finish_reason == types_pb2.FINISH_REASON_ABORT
    await until(lambda: all(not w.running_ids for w in fleet.workers), lambda: "blocks still held")
    assert all(w.gpu_free == w.gpu_blocks for w in fleet.workers)


async def test_a_broken_stream_detaches_its_requests_as_generate_does(redis_url: str) -> None:
    workers = [StubWorker("w0", step_s=0.01)]
    fleet = await start_fleet(redis_url, workers, disconnect_grace_s=0.2)
    try:
        call = fleet.client.GenerateStream()
        await call.write(submit((1, generate_request([5] * 4, 200, request_id="dropped")),
                                (2, generate_request([6] * 4, 40, request_id="kept"))))  # fmt: skip
        seen: dict[int, Tagged] = {}
        while not all(len(seen.get(t, Tagged()).tokens) >= 2 for t in (1, 2)):
            assert not any(s.error for s in seen.values()), seen
            for event in (await call.read()).events:
                seen.setdefault(event.tag, Tagged()).take(event)
        call.cancel()  # the client's stream breaks
        # Within the grace a client re-attaches to one of them: that one runs on to its end.
        attach = fleet.client.Attach(scheduler_pb2.AttachRequest(request_id="kept", offset=0))
        tokens, final = await asyncio.wait_for(collect(attach), 30)
        assert tokens == expected_tokens([6] * 4, 40)
        assert final.finish_reason == types_pb2.FINISH_REASON_LENGTH
        # Nobody re-attached to the other: cancelled after the grace, long before its 200 tokens.
        core = fleet.server.core
        await until(lambda: core.requests["dropped"].finished, lambda: "still running", timeout_s=5)
        record = core.requests["dropped"].record
        assert record.finish_reason == "abort" and record.output_tokens < 200
        await until(lambda: not workers[0].running_ids, lambda: workers[0].running_ids)
    finally:
        await fleet.close()


async def test_requests_of_a_stream_survive_a_scheduler_restart(redis_url: str) -> None:
    workers = [StubWorker("w0", step_s=0.004), StubWorker("w1", step_s=0.004)]
    for w in workers:
        w.gpu_blocks = 4 * 12 * 3  # three requests at a time each: some wait
    fleet = await start_fleet(redis_url, workers)
    try:
        prompts = {f"m{i}": [i + 3] * 6 for i in range(12)}
        tags = {i: rid for i, rid in enumerate(prompts)}
        call = fleet.client.GenerateStream()
        await call.write(submit(*((t, generate_request(prompts[rid], 40, rid)) for t, rid in tags.items())))
        seen: dict[int, Tagged] = {}

        async def read() -> None:
            try:
                await read_all(call, seen)
            except grpc.aio.AioRpcError as err:
                assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err

        reading = asyncio.ensure_future(read())
        await until(
            lambda: sum(len(w.running_ids) for w in workers) == 6 and len(fleet.server.core.queue) > 0,
            lambda: f"running {[w.running_ids for w in workers]}",
        )
        await asyncio.wait_for(fleet.restart_scheduler(), 20)
        await asyncio.wait_for(reading, 10)  # the stream broke with the old scheduler
        # The client re-attaches every unfinished request by id from what it has (as for Generate).
        for tag, rid in tags.items():
            got = seen.setdefault(tag, Tagged(request_id=rid))
            if got.final is None:
                resume = scheduler_pb2.AttachRequest(request_id=rid, offset=len(got.tokens))
                attach = fleet.client.Attach(resume)
                rest, final = await asyncio.wait_for(collect_from(attach, len(got.tokens)), 30)
                got.tokens += rest
                got.final = final
            assert got.tokens == expected_tokens(prompts[rid], 40), rid
            assert got.final.finish_reason == types_pb2.FINISH_REASON_LENGTH
        second = [rid for w in workers for rid in w.dispatched if rid.endswith("@1")]
        assert len(second) >= 6, second
    finally:
        await fleet.close()


async def collect_from(stream: Any, offset: int) -> tuple[list[int], Any]:
    tokens: list[int] = []
    final = None
    async for response in stream:
        if response.HasField("chunk"):
            assert response.chunk.offset == offset + len(tokens)
            tokens.extend(response.chunk.token_ids)
        else:
            final = response.final
    return tokens, final


async def test_redis_holds_the_same_for_a_streamed_request_as_for_generate(fleet: Fleet) -> None:
    prompt = [11, 12, 13]
    request = generate_request(prompt, 7, request_id="via-generate")
    request.slo.ttft_s = 2.0
    request.expected_output_tokens = 5
    await collect(fleet.client.Generate(request))
    streamed = scheduler_pb2.GenerateRequest()
    streamed.CopyFrom(request)
    streamed.request_id = "via-stream"
    call = fleet.client.GenerateStream()
    await call.write(submit((3, streamed)))
    await call.done_writing()
    seen: dict[int, Tagged] = {}
    await asyncio.wait_for(read_all(call, seen), 30)
    store = fleet.server.core.store
    a, b = await store.get_request("via-generate"), await store.get_request("via-stream")
    assert a is not None and b is not None
    times = {"request_id", "arrival_time", "dispatch_time", "first_token_time", "finish_time", "worker_id"}
    assert {k: v for k, v in vars(a).items() if k not in times} == {
        k: v for k, v in vars(b).items() if k not in times
    }
    assert await store.get_tokens("via-generate") == await store.get_tokens("via-stream") == seen[3].tokens
    # A retry of the same id on a stream attaches to the first run, as Generate's does.
    call = fleet.client.GenerateStream()
    await call.write(submit((4, streamed)))
    await call.done_writing()
    again: dict[int, Tagged] = {}
    await asyncio.wait_for(read_all(call, again), 30)
    assert again[4].request_id == "via-stream" and again[4].tokens == seen[3].tokens
    assert sum(1 for w in fleet.workers for rid in w.dispatched if rid.startswith("via-stream")) == 1


async def test_the_stream_needs_the_bearer_token(redis_url: str) -> None:
    fleet = await start_fleet(redis_url, [StubWorker("w0")], api_token="s3cret")
    try:
        call = fleet.client.GenerateStream()
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the write may already see the refusal
            await call.write(submit((1, generate_request([1], 2))))
            await call.done_writing()
            await read_all(call, {})
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = fleet.client.GenerateStream(metadata=(("authorization", "Bearer s3cret"),))
        await call.write(submit((1, generate_request([1], 2))))
        await call.done_writing()
        seen: dict[int, Tagged] = {}
        await asyncio.wait_for(read_all(call, seen), 30)
        assert seen[1].tokens == expected_tokens([1], 2)
    finally:
        await fleet.close()


async def test_the_workers_facts_are_read_once_per_message(fleet: Fleet, monkeypatch) -> None:
    # Admission checks every request of a message against one reading of the fleet (workers,
    # tokenizer, vocabulary, longest length), not one reading per request.
    import scheduler_svc.multiplex as multiplex

    reads = []
    real = multiplex.fleet_facts

    def counting(core):
        reads.append(1)
        return real(core)

    monkeypatch.setattr(multiplex, "fleet_facts", counting)
    call = fleet.client.GenerateStream()
    too_long = generate_request([1], 10**6)  # past every worker's max_model_len: refused alone
    await call.write(submit(*((t, generate_request([t + 1] * 3, 2)) for t in range(20)), (20, too_long)))
    await call.write(submit(*((t, generate_request([t + 1] * 2, 3)) for t in range(30, 40))))
    await call.done_writing()
    seen: dict[int, Tagged] = {}
    await asyncio.wait_for(read_all(call, seen), 30)
    assert len(reads) == 2
    for tag in [*range(20), *range(30, 40)]:
        prompt = [tag + 1] * (3 if tag < 20 else 2)
        assert seen[tag].error is None and seen[tag].tokens == expected_tokens(prompt, 2 if tag < 20 else 3)
    assert seen[20].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "more than the longest the workers accept" in seen[20].error.message
