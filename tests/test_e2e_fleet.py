"""End to end: a scheduler process and two ``layerkv worker`` processes, real Redis, real gRPC.

One fleet serves the whole module (process start-ups dominate the cost); the tests run in file
order and the only one that breaks the fleet (killing a worker) comes last.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import struct_pb2

from common.proto.layerkv.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from common.types import SamplingParams
from layerkv.remote_generate import RemoteOptions, generate_remote
from tests.fleet import Fleet, RedisProcess, make_engine, reference_outputs, start_fleet, wait_workers_healthy
from tests.streams import Streamed, stream_attach, stream_generate, token_request

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp: Path = tmp_path_factory.mktemp("fleet")
    redis = RedisProcess(tmp)
    try:
        f = start_fleet(tmp, redis.url, num_workers=2, self_register=True)
        yield f
        f.stop()
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def engine() -> Any:
    """The in-process reference: same preset and seed as the workers, so the same weights."""
    return make_engine()


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[256, *(rng.randrange(256) for _ in range(rng.randint(1, 40)))] for _ in range(n)]


async def _worker_free_blocks(address: str) -> tuple[int, int, list[int]]:
    """(GPU free, GPU total, GPU blocks per layer) from the worker's own event stream."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = worker_pb2_grpc.WorkerServiceStub(ch).StreamEvents(worker_pb2.StreamEventsRequest())
        first = await anext(call.__aiter__())
        call.cancel()
    return first.gpu.free_blocks, first.gpu.total_blocks, list(first.gpu.used_blocks_per_layer)


async def test_100_concurrent_generates_match_the_in_process_engine(fleet: Fleet, engine: Any) -> None:
    prompts = _prompts(100, seed=1)
    async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        results = await asyncio.gather(*(stream_generate(stub, token_request(p, 8)) for p in prompts))
        infos = await asyncio.gather(
            *(stub.GetRequest(scheduler_pb2.GetRequestRequest(request_id=r.request_id)) for r in results)
        )
    want = reference_outputs(engine, prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert [r.token_ids for r in results] == want
    for r, p in zip(results, prompts, strict=True):
        assert r.final is not None and r.final.finish_reason == types_pb2.FINISH_REASON_LENGTH
        assert (r.final.prompt_tokens, r.final.output_tokens) == (len(p), 8)
        assert 0 <= r.final.queue_s <= r.final.ttft_s <= r.final.latency_s
    assert len({r.request_id for r in results}) == 100
    assert all(i.request.status == scheduler_pb2.REQUEST_STATUS_FINISHED for i in infos)
    assert {i.request.worker_id for i in infos} == {"worker-0", "worker-1"}  # both workers served


async def test_text_prompts_are_tokenized_with_the_workers_tokenizer(fleet: Fleet, engine: Any) -> None:
    text = "LayerKV keeps the queue short"
    async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        got = await stream_generate(
            stub,
            scheduler_pb2.GenerateRequest(
                text=text, sampling=types_pb2.SamplingParams(max_tokens=6, ignore_eos=True)
            ),
        )
    prompt = engine.tokenizer.encode(text)
    want = reference_outputs(engine, [prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert got.token_ids == want
    assert got.final.prompt_tokens == len(prompt)
    assert got.text == engine.tokenizer.decode(want)


async def test_cancel_mid_stream_frees_the_blocks_on_its_worker(fleet: Fleet) -> None:
    async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        call = stub.Generate(token_request([256, 1, 2, 3], 1500, request_id="to-cancel"))
        seen = Streamed(request_id="to-cancel")
        async for msg in call:
            seen.take(msg)
            if len(seen.token_ids) >= 3:
                break
        info = await stub.GetRequest(scheduler_pb2.GetRequestRequest(request_id="to-cancel"))
        assert info.request.status == scheduler_pb2.REQUEST_STATUS_RUNNING
        worker = next(w for w in fleet.workers if w.name == info.request.worker_id)
        free, total, _ = await _worker_free_blocks(worker.address)
        assert free < total  # it holds blocks while it runs
        assert (await stub.Cancel(scheduler_pb2.CancelRequest(request_id="to-cancel"))).cancelled
        async for msg in call:  # the stream ends with an ABORT final
            seen.take(msg)
        assert seen.final is not None and seen.final.finish_reason == types_pb2.FINISH_REASON_ABORT
        assert len(seen.token_ids) < 1500
        for _ in range(100):
            free, total, per_layer = await _worker_free_blocks(worker.address)
            if free == total:
                break
            await asyncio.sleep(0.05)
        assert (free, per_layer) == (total, [0, 0, 0, 0])
        assert not (await stub.Cancel(scheduler_pb2.CancelRequest(request_id="to-cancel"))).cancelled


async def test_reattach_after_a_disconnect_loses_and_repeats_nothing(fleet: Fleet, engine: Any) -> None:
    prompt = [256, 7, 7, 7, 42]
    async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        call = stub.Generate(token_request(prompt, 300, request_id="reattach-me"))
        seen = Streamed(request_id="reattach-me")
        async for msg in call:
            seen.take(msg)
            if len(seen.token_ids) >= 5:
                break
        call.cancel()  # the client goes away mid-stream
    assert seen.final is None
    async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        await stream_attach(stub, "reattach-me", seen)
        # A retry of the same id attaches to the first run instead of running twice.
        again = await stream_generate(stub, token_request(prompt, 300, request_id="reattach-me"))
    want = reference_outputs(engine, [prompt], SamplingParams(max_tokens=300, ignore_eos=True))[0]
    assert seen.token_ids == want
    assert seen.final is not None and seen.final.output_tokens == 300
    assert again.token_ids == want


async def test_set_policy_under_load_loses_nothing_and_keeps_the_workers(fleet: Fleet, engine: Any) -> None:
    pids = [w.pid for w in fleet.workers]
    prompts = _prompts(30, seed=2)
    async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        names = [p.name for p in (await admin.ListPolicies(admin_pb2.ListPoliciesRequest())).policies]
        assert {"fcfs-full", "least-loaded"} <= set(names)
        before = (await admin.GetPolicy(admin_pb2.GetPolicyRequest())).policy.name
        target = "fcfs-full" if before != "fcfs-full" else "least-loaded"
        tasks = [asyncio.create_task(stream_generate(stub, token_request(p, 24))) for p in prompts]
        await asyncio.sleep(0.3)
        reply = await admin.SetPolicy(
            admin_pb2.SetPolicyRequest(policy=admin_pb2.PolicySpec(name=target, params=struct_pb2.Struct()))
        )
        assert reply.previous.name == before and reply.current.name == target
        results = await asyncio.gather(*tasks)
        assert (await admin.GetPolicy(admin_pb2.GetPolicyRequest())).policy.name == target
        workers = (await admin.ListWorkers(admin_pb2.ListWorkersRequest())).workers
        # Put the original policy back for the rest of the module.
        await admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=admin_pb2.PolicySpec(name=before)))
    want = reference_outputs(engine, prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    assert [r.token_ids for r in results] == want
    assert all(r.final.finish_reason == types_pb2.FINISH_REASON_LENGTH for r in results)
    assert [w.pid for w in fleet.workers] == pids
    assert all(w.proc is not None and w.proc.poll() is None for w in fleet.workers)  # never restarted
    assert sorted(w.worker_id for w in workers if w.healthy) == ["worker-0", "worker-1"]


async def test_bad_input_gets_the_right_status_and_disturbs_nothing(fleet: Fleet, engine: Any) -> None:
    async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        admin = admin_pb2_grpc.AdminServiceStub(ch)

        async def code_of(coro: Awaitable[Any]) -> grpc.StatusCode:
            try:
                await coro
            except grpc.aio.AioRpcError as err:
                assert err.details(), "every error status carries a message"
                return err.code()
            raise AssertionError("the call should have failed")

        async def gen(req: scheduler_pb2.GenerateRequest) -> None:
            async for _ in stub.Generate(req):
                pass

        invalid = [
            scheduler_pb2.GenerateRequest(text="", sampling=types_pb2.SamplingParams(max_tokens=4)),
            token_request([], 4),
            token_request([256] * 3000, 4),  # longer than the model's context
            token_request([256, 1], 4, temperature=-1.0),
            token_request([256, 1], 4, top_p=1.5),
            token_request([256, 1], 100_000),
        ]
        for req in invalid:
            assert await code_of(gen(req)) == grpc.StatusCode.INVALID_ARGUMENT, req
        missing = "no-such-request"
        assert await code_of(stub.GetRequest(scheduler_pb2.GetRequestRequest(request_id=missing))) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert await code_of(stub.Cancel(scheduler_pb2.CancelRequest(request_id=missing))) == (
            grpc.StatusCode.NOT_FOUND
        )

        async def attach() -> None:
            async for _ in stub.Attach(scheduler_pb2.AttachRequest(request_id=missing)):
                pass

        assert await code_of(attach()) == grpc.StatusCode.NOT_FOUND
        assert (
            await code_of(
                admin.SetPolicy(
                    admin_pb2.SetPolicyRequest(policy=admin_pb2.PolicySpec(name="no-such-policy"))
                )
            )
            == grpc.StatusCode.NOT_FOUND
        )
        # Still serving, with the same answers.
        got = await stream_generate(stub, token_request([256, 3, 4], 5))
    assert (
        got.token_ids
        == reference_outputs(engine, [[256, 3, 4]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    )


async def test_remote_generate_prints_streams_in_input_order(fleet: Fleet, engine: Any) -> None:
    prompts = ["first prompt", "a second, longer prompt"]
    opts = RemoteOptions(max_tokens=7, ignore_eos=True)
    text_out, json_out = io.StringIO(), io.StringIO()
    results = await generate_remote(fleet.scheduler.address, prompts, opts, False, text_out)
    await generate_remote(fleet.scheduler.address, prompts, opts, True, json_out)
    want = reference_outputs(
        engine, [engine.tokenizer.encode(p) for p in prompts], SamplingParams(max_tokens=7, ignore_eos=True)
    )
    assert [r.token_ids for r in results] == want
    # The printed text is exactly the streamed text deltas, in input order, and they add up to the
    # decode of all tokens (a trailing incomplete UTF-8 sequence is flushed when the output ends).
    texts = [r.text for r in results]
    assert texts == [engine.tokenizer.decode(w) for w in want]
    assert text_out.getvalue() == "".join(t + "\n" for t in texts)
    records = [json.loads(line) for line in json_out.getvalue().splitlines()]
    assert [(r["index"], r["token_ids"], r["text"], r["finish_reason"]) for r in records] == [
        (0, want[0], texts[0], "length"),
        (1, want[1], texts[1], "length"),
    ]


async def test_killing_a_worker_mid_stream_finishes_its_requests_elsewhere(fleet: Fleet, engine: Any) -> None:
    prompts = _prompts(12, seed=3)
    async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        tasks = [
            asyncio.create_task(stream_generate(stub, token_request(p, 400, request_id=f"kill-{i}")))
            for i, p in enumerate(prompts)
        ]
        victim = fleet.workers[0]
        # Kill it once it has streamed tokens of at least one of these requests.
        for _ in range(600):
            await asyncio.sleep(0.05)
            try:
                infos = await asyncio.gather(
                    *(
                        stub.GetRequest(scheduler_pb2.GetRequestRequest(request_id=f"kill-{i}"))
                        for i in range(len(prompts))
                    )
                )
            except grpc.aio.AioRpcError as err:  # not all submitted yet
                assert err.code() == grpc.StatusCode.NOT_FOUND
                continue
            if any(i.request.worker_id == victim.name and i.request.output_tokens > 0 for i in infos):
                break
        else:
            raise AssertionError("no request ever ran on worker-0")
        victim.kill()
        results = await asyncio.gather(*tasks)
        infos = await asyncio.gather(
            *(
                stub.GetRequest(scheduler_pb2.GetRequestRequest(request_id=f"kill-{i}"))
                for i in range(len(prompts))
            )
        )
    want = reference_outputs(engine, prompts, SamplingParams(max_tokens=400, ignore_eos=True))
    assert [r.token_ids for r in results] == want  # no token lost or repeated across the move
    assert all(r.final.finish_reason == types_pb2.FINISH_REASON_LENGTH for r in results)
    assert any(i.request.requeues > 0 for i in infos)
    assert {i.request.worker_id for i in infos} == {"worker-1"}
    wait_workers_healthy(fleet.scheduler.address, 1)
