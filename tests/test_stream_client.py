"""``common.stream_client`` and ``layerkv generate --endpoint`` over real gRPC, real Redis and stub
workers: many requests share one GenerateStream call, outputs equal the per-call path's, a cancel
ends only its request, refusals raise what Generate raised, a scheduler without GenerateStream gets
one Generate call each, and a scheduler restart loses or repeats no token."""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from typing import Any

import grpc
import grpc.aio
import pytest

from common.errors import LayerKVError
from common.proto.layerkv.v1 import scheduler_pb2_grpc
from common.stream_client import Finished, GenerateClient, GenerateJob, RequestStream, Tokens
from common.types import FinishReason, SamplingParams
from layerkv.remote_generate import RemoteOptions, generate_remote
from scheduler_svc.testing.fleet import CLIENT_OPTIONS, Fleet, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens


class CallCounter:
    """Counts the calls a channel makes, by method name (grpc takes one interceptor per kind)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.interceptors = [_CountUnaryStream(self), _CountStreamStream(self)]

    def count(self, details: Any) -> None:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        self.calls[method.rsplit("/", 1)[-1]] += 1


class _CountUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, counter: CallCounter) -> None:
        self.counter = counter

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.counter.count(details)
        return await continuation(details, request)


class _CountStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, counter: CallCounter) -> None:
        self.counter = counter

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        self.counter.count(details)
        return await continuation(details, requests)


@pytest.fixture
async def fleet(redis_url: str):
    fleet = await start_fleet(redis_url, [StubWorker("w0", step_s=0.003), StubWorker("w1", step_s=0.003)])
    yield fleet
    await fleet.close()


def counted_channel(address: str) -> tuple[grpc.aio.Channel, CallCounter]:
    counter = CallCounter()
    channel = grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS, interceptors=counter.interceptors)
    return channel, counter


def job(prompt: list[int], max_tokens: int, request_id: str = "") -> GenerateJob:
    return GenerateJob(tuple(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), request_id)


async def consume(stream: RequestStream, tokens: list[int] | None = None) -> tuple[list[int], str, Finished]:
    """Tokens (into ``tokens``), text and final of one request; checks none is lost or repeated."""
    tokens = [] if tokens is None else tokens
    text = ""
    async for event in stream:
        if isinstance(event, Tokens):
            assert event.offset == len(tokens), (event.offset, len(tokens))
            tokens += event.token_ids
            text += event.text
        else:
            return tokens, text, event
    raise AssertionError("no final")


async def until(condition: Any, describe: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {describe()}"
        await asyncio.sleep(0.002)


async def test_many_concurrent_requests_share_one_stream(fleet: Fleet) -> None:
    channel, counter = counted_channel(fleet.address)
    client = GenerateClient(channel)
    prompts = [[i % 200 + 1] * (3 + i % 7) for i in range(60)]
    streams = [client.generate(job(p, 5 + i % 4)) for i, p in enumerate(prompts)]
    outcomes = await asyncio.gather(*map(consume, streams))
    for i, (prompt, (tokens, _, final)) in enumerate(zip(prompts, outcomes, strict=True)):
        assert tokens == expected_tokens(prompt, 5 + i % 4)
        assert final.finish_reason is FinishReason.LENGTH and final.output_tokens == len(tokens)
        assert final.prompt_tokens == len(prompt)
    assert counter.calls == {"GenerateStream": 1}, counter.calls  # not 60 Generate calls
    # The stream is long-lived: later requests ride the same call.
    tokens, _, _ = await consume(client.generate(job([9, 9, 9], 4)))
    assert tokens == expected_tokens([9, 9, 9], 4)
    assert counter.calls == {"GenerateStream": 1} and client.stream_calls == 1
    await client.close()
    await channel.close(None)


async def test_remote_generate_output_equals_the_per_call_path(fleet: Fleet) -> None:
    prompts = ["hi", "héllo", "a longer prompt", "zz"] * 5
    outputs = {}
    for multiplex in (True, False):
        text, lines = io.StringIO(), io.StringIO()
        opts = RemoteOptions(max_tokens=7, ignore_eos=True, multiplex=multiplex)
        results = await generate_remote(fleet.address, prompts, opts, False, text)
        await generate_remote(fleet.address, prompts, opts, True, lines)
        outputs[multiplex] = (
            [(r.token_ids, r.text, r.finish_reason, r.error) for r in results],
            text.getvalue(),
            [line.split('"ttft_s"')[0] for line in lines.getvalue().splitlines()],  # timings differ
        )
    assert outputs[True] == outputs[False]
    tokenizer = fleet.workers[0].tokenizer
    for prompt, (ids, text, reason, _) in zip(prompts, outputs[True][0], strict=True):
        assert ids == expected_tokens(tokenizer.encode(prompt), 7) and reason == "length"
        assert text == bytes(ids).decode()


@pytest.mark.parametrize("multiplex", [True, False])
async def test_cancel_ends_only_its_request(redis_url: str, multiplex: bool) -> None:
    # A long grace: the cancel itself ends the request, not the scheduler's disconnect grace.
    workers = [StubWorker("w0", step_s=0.003), StubWorker("w1", step_s=0.003)]
    fleet = await start_fleet(redis_url, workers, disconnect_grace_s=120)
    try:
        await cancel_one_of_two(fleet, GenerateClient(fleet.channel, multiplex=multiplex))
    finally:
        await fleet.close()


async def cancel_one_of_two(fleet: Fleet, client: GenerateClient) -> None:
    doomed = client.generate(job([4] * 5, 200, request_id="doomed"))
    kept = client.generate(job([6] * 5, 60, request_id="kept"))
    kept_result = asyncio.ensure_future(consume(kept))
    first = await anext(doomed)
    assert isinstance(first, Tokens)
    doomed.cancel()
    rest = [event async for event in doomed]
    final = rest[-1]
    assert isinstance(final, Finished) and final.finish_reason is FinishReason.ABORT
    assert final.output_tokens < 200
    tokens, _, kept_final = await asyncio.wait_for(kept_result, 30)
    assert tokens == expected_tokens([6] * 5, 60) and kept_final.finish_reason is FinishReason.LENGTH
    core = fleet.server.core
    await until(lambda: core.requests["doomed"].finished, lambda: "not cancelled")  # at once, no grace
    assert core.requests["doomed"].record.finish_reason == "abort"
    assert core.requests["kept"].record.finish_reason == "length"
    await until(lambda: all(not w.running_ids for w in fleet.workers), lambda: "still running")
    await client.close()


async def test_a_cancel_before_the_request_was_sent_sends_nothing(fleet: Fleet) -> None:
    client = GenerateClient(fleet.channel)
    stream = client.generate(job([5] * 3, 50, request_id="never-sent"))
    stream.cancel()  # same pass of the loop: the writer has not run yet
    assert [event async for event in stream] == [Finished(FinishReason.ABORT, 0, 0, 0.0, 0.0, 0.0, 0.0)]
    tokens, _, _ = await consume(client.generate(job([5] * 3, 3)))
    assert tokens == expected_tokens([5] * 3, 3)
    assert "never-sent" not in fleet.server.core.requests
    await client.close()


@pytest.mark.parametrize("multiplex", [True, False])
async def test_refusals_raise_what_generate_raised(fleet: Fleet, multiplex: bool) -> None:
    """A tagged StreamStatus becomes the error class and message of the per-call status."""
    client = GenerateClient(fleet.channel, multiplex=multiplex)
    refused = [job([1, 2], 10**7), GenerateJob((), SamplingParams(max_tokens=3))]  # too long, no prompt
    errors = []
    for bad in refused:
        with pytest.raises(LayerKVError) as caught:
            await consume(client.generate(bad))
        errors.append((type(caught.value), str(caught.value)))
    tokens, _, _ = await consume(client.generate(job([3, 3], 3)))  # the stream goes on
    assert tokens == expected_tokens([3, 3], 3)
    await client.close()
    per_call = GenerateClient(fleet.channel, multiplex=False)
    for (cls, message), bad in zip(errors, refused, strict=True):
        with pytest.raises(cls) as caught:
            await consume(per_call.generate(bad))
        assert str(caught.value) == message
    await per_call.close()


class OlderScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """A scheduler from before GenerateStream: Generate (forwarded), GenerateStream UNIMPLEMENTED."""

    def __init__(self, upstream: scheduler_pb2_grpc.SchedulerServiceStub) -> None:
        self.upstream = upstream
        self.generate_calls = 0

    async def Generate(self, request: Any, context: Any) -> Any:
        self.generate_calls += 1
        async for response in self.upstream.Generate(request):
            yield response


async def test_falls_back_to_generate_when_the_scheduler_has_no_stream(fleet: Fleet) -> None:
    older = OlderScheduler(fleet.client)
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(older, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel, counter = counted_channel(f"127.0.0.1:{port}")
    try:
        client = GenerateClient(channel)
        prompts = [[i + 1] * 4 for i in range(8)]
        outcomes = await asyncio.gather(*(consume(client.generate(job(p, 6))) for p in prompts))
        assert [tokens for tokens, _, _ in outcomes] == [expected_tokens(p, 6) for p in prompts]
        assert not client.multiplex and older.generate_calls == 8
        assert counter.calls == {"GenerateStream": 1, "Generate": 8}
        tokens, _, _ = await consume(client.generate(job([7], 3)))  # later ones go per call directly
        assert tokens == expected_tokens([7], 3) and counter.calls["GenerateStream"] == 1
        await client.close()
    finally:
        await channel.close(None)
        await server.stop(0)


@pytest.mark.parametrize("client_ids", [True, False])
async def test_requests_resume_after_a_scheduler_restart(redis_url: str, client_ids: bool) -> None:
    workers = [StubWorker("w0", step_s=0.004), StubWorker("w1", step_s=0.004)]
    for w in workers:
        w.gpu_blocks = 4 * 12 * 3  # three requests at a time each: some wait
    fleet = await start_fleet(redis_url, workers)
    try:
        client = GenerateClient(fleet.channel)
        prompts = [[i + 3] * 6 for i in range(12)]
        streams = [client.generate(job(p, 40, f"r{i}" if client_ids else "")) for i, p in enumerate(prompts)]
        seen: list[list[int]] = [[] for _ in streams]
        results = [asyncio.ensure_future(consume(s, got)) for s, got in zip(streams, seen, strict=True)]
        await until(
            lambda: sum(len(w.running_ids) for w in workers) == 6 and len(fleet.server.core.queue) > 0,
            lambda: f"running {[w.running_ids for w in workers]}",
        )
        await until(lambda: sum(map(bool, seen)) >= 6, lambda: "no tokens yet")
        await asyncio.wait_for(fleet.restart_scheduler(), 20)
        outcomes = await asyncio.wait_for(asyncio.gather(*results), 60)
        per_call = GenerateClient(fleet.channel, multiplex=False)
        for prompt, stream, (tokens, text, final) in zip(prompts, streams, outcomes, strict=True):
            assert tokens == expected_tokens(prompt, 40)  # consume() checked: none lost or repeated
            assert final.finish_reason is FinishReason.LENGTH
            # The text too is what the per-call path reads for that id (replayed from its record).
            again = await consume(per_call.generate(job(prompt, 40, stream.request_id)))
            assert again[:2] == (tokens, text)
        assert client.stream_calls >= 2  # it reopened the stream
        await client.close()
    finally:
        await fleet.close()


@pytest.mark.parametrize("multiplex", [True, False])
async def test_an_endpoint_never_reached_fails_at_once_as_generate_does(multiplex: bool) -> None:
    from common.errors import Unavailable
    from layerkv.testing.ports import free_port

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")
    client = GenerateClient(channel, multiplex=multiplex)
    started = asyncio.get_running_loop().time()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(consume(client.generate(job([1], 2))), 10)
    assert asyncio.get_running_loop().time() - started < client.reconnect_s / 3  # no reconnect loop
    await client.close()
    await channel.close(None)


async def test_the_cli_streams_by_default_and_per_call_on_request(fleet: Fleet) -> None:
    """``layerkv generate --endpoint`` prints the same JSON lines either way (timings aside)."""
    import json
    import os
    import subprocess
    import sys

    outputs = []
    for extra in ([], ["--per-call"]):
        # subprocess.run in a thread, not asyncio's subprocess: uvloop spawns with fork(), whose
        # child runs gRPC's fork handlers beside this process's live servers and can crash before
        # exec (seen: 1 run in 8 died of SIGSEGV); subprocess uses vfork.
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "layerkv", "generate", "--endpoint", fleet.address, "--json",
             "--max-tokens", "6", "--ignore-eos", "hi", "héllo", *extra],
            capture_output=True, text=True, timeout=60, env={**os.environ, "LAYERKV_API_TOKEN": ""},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        outputs.append([(r["index"], r["token_ids"], r["text"], r["finish_reason"]) for r in lines])
    assert outputs[0] == outputs[1]
    tokenizer = fleet.workers[0].tokenizer
    want = [expected_tokens(tokenizer.encode(p), 6) for p in ("hi", "héllo")]
    assert [ids for _, ids, _, _ in outputs[0]] == want
