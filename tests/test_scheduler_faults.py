"""Scheduler defects under faults, in process (stub workers, real gRPC, real redis-server): a Redis
stall holds tokens back instead of sending unsaved ones; a Cancel racing its Generate; refused
dispatches back off; a request that can never fit is refused at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.proto.layerkv.v1 import scheduler_pb2, types_pb2
from layerkv.testing.redis_server import RedisServer
from scheduler_svc.testing.fleet import collect, generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens


async def test_no_token_is_sent_while_redis_is_stalled(tmp_path: Path) -> None:
    """Persist before send: while Redis is stalled no new token reaches the client (none is
    saved); afterwards the stream completes with every token once, equal to what Redis holds."""
    redis_server = RedisServer(tmp_path).start()
    worker = StubWorker("w0", step_s=0.02)
    fleet = await start_fleet(redis_server.url, [worker])
    try:
        seen: list[int] = []

        async def read() -> None:
            async for response in fleet.client.Generate(generate_request([9, 9], 200, request_id="stall")):
                if response.HasField("chunk"):
                    seen.extend(response.chunk.token_ids)

        reader = asyncio.create_task(read())
        while len(seen) < 5:
            assert not reader.done(), reader
            await asyncio.sleep(0.01)
        redis_server.pause()
        try:
            await asyncio.sleep(0.5)  # what was acknowledged before the stall may still arrive
            before = len(seen)
            await asyncio.sleep(1.5)  # the stub worker keeps producing tokens meanwhile
            during = len(seen)
        finally:
            redis_server.resume()
        assert during == before, f"{during - before} unsaved tokens reached the client during the stall"
        await asyncio.wait_for(reader, 30)
        assert seen == expected_tokens([9, 9], 200)
        assert await fleet.server.store.get_tokens("stall") == seen
    finally:
        await fleet.close()
        redis_server.stop()


async def test_cancel_of_a_stored_request_not_yet_in_memory_is_honoured(redis_url: str) -> None:
    """The Cancel arrives between the Redis create and the request entering memory."""
    worker = StubWorker("w0", step_s=0.01)
    fleet = await start_fleet(redis_url, [worker])
    store = fleet.server.store
    create = store.create_request
    cancelled: list[bool] = []

    async def slow_create(record, score):  # type: ignore[no-untyped-def]
        created = await create(record, score)
        reply = await fleet.client.Cancel(scheduler_pb2.CancelRequest(request_id=record.request_id))
        cancelled.append(reply.cancelled)
        return created

    store.create_request = slow_create  # type: ignore[method-assign]
    try:
        tokens, final = await asyncio.wait_for(
            collect(fleet.client.Generate(generate_request([1, 2], 200, request_id="racing"))), 10
        )
        assert cancelled == [True]
        assert final.finish_reason == types_pb2.FINISH_REASON_ABORT and len(tokens) < 200
    finally:
        await fleet.close()


async def test_refused_dispatches_back_off(redis_url: str) -> None:
    worker = StubWorker("w0", step_s=0.01)
    worker.refuse_next = 10**9  # a worker whose free blocks the ledger over-estimates
    fleet = await start_fleet(redis_url, [worker])
    try:
        task = asyncio.ensure_future(
            collect(fleet.client.Generate(generate_request([3, 4], 8, request_id="bo")))
        )
        await asyncio.sleep(1.5)
        refused = worker.refused
        assert 2 <= refused <= 12, f"{refused} refusals in 1.5 s: no backoff"
        worker.refuse_next = 0
        tokens, final = await asyncio.wait_for(task, 10)
        assert tokens == expected_tokens([3, 4], 8) and final.finish_reason == types_pb2.FINISH_REASON_LENGTH
    finally:
        await fleet.close()


async def test_a_request_no_worker_can_ever_hold_is_refused_at_once(redis_url: str) -> None:
    worker = StubWorker("w0", step_s=0.01)
    worker.gpu_blocks, worker.host_blocks = 192, 4096  # fits GPU + host, never the GPU alone
    fleet = await start_fleet(redis_url, [worker], policy="fcfs-full")
    try:
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(fleet.client.Generate(generate_request([7] * 1024, 128), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "GPU blocks" in (err.value.details() or "") and "fcfs-full" in (err.value.details() or "")
        assert time.monotonic() - start < 5
        tokens, _ = await collect(fleet.client.Generate(generate_request([7] * 16, 8)))
        assert tokens == expected_tokens([7] * 16, 8)  # the service keeps serving
    finally:
        await fleet.close()


async def test_a_token_reaches_the_client_only_after_it_is_saved(redis_url: str) -> None:
    """Hold every token-carrying commit: the client must not see any token Redis does not hold
    (a scheduler crashing now would regenerate from Redis and contradict the client)."""
    worker = StubWorker("w0", step_s=0.02)
    fleet = await start_fleet(redis_url, [worker])
    store = fleet.server.store
    original = store.commit_many
    gate = asyncio.Event()
    gate.set()

    async def gated(batches, *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(batch.tokens for batch in batches):
            await gate.wait()
        return await original(batches, *args, **kwargs)

    store.commit_many = gated  # type: ignore[method-assign]
    seen: list[int] = []
    try:

        async def read() -> None:
            async for response in fleet.client.Generate(generate_request([4, 4], 100, request_id="held")):
                if response.HasField("chunk"):
                    seen.extend(response.chunk.token_ids)

        reader = asyncio.create_task(read())
        while len(seen) < 3:
            assert not reader.done(), reader
            await asyncio.sleep(0.005)
        gate.clear()
        await asyncio.sleep(0.5)  # the worker keeps stepping; its events wait for the commit
        saved = await store.get_tokens("held")
        assert seen == saved[: len(seen)] and len(seen) <= len(saved), (len(seen), len(saved))
        gate.set()
        await asyncio.wait_for(reader, 30)
        assert seen == expected_tokens([4, 4], 100) == await store.get_tokens("held")
    finally:
        gate.set()
        await fleet.close()


class SlowReplyWorker(StubWorker):
    """Takes the first dispatch, then answers it too late (the scheduler's call times out)."""

    slow_once: bool = True

    async def Dispatch(self, request, context):  # type: ignore[no-untyped-def]
        reply = await super().Dispatch(request, context)
        if self.slow_once:
            self.slow_once = False
            await asyncio.sleep(1.0)
        return reply


async def test_a_dispatch_timing_out_after_acceptance_is_rerun_under_a_new_attempt(redis_url: str) -> None:
    worker = SlowReplyWorker("w0", step_s=0.01)
    fleet = await start_fleet(redis_url, [worker])
    fleet.server.core.client._timeout_s = 0.3  # type: ignore[attr-defined]
    try:
        tokens, final = await asyncio.wait_for(
            collect(fleet.client.Generate(generate_request([8, 9], 100, request_id="late"))), 20
        )
        assert (
            tokens == expected_tokens([8, 9], 100) and final.finish_reason == types_pb2.FINISH_REASON_LENGTH
        )
        assert worker.dispatched[:2] == ["late@0", "late@1"]  # the accepted attempt's id is never reused
        deadline = time.monotonic() + 5
        while "late@0" not in worker.aborted:  # the attempt it took late is stopped there
            assert time.monotonic() < deadline, worker.aborted
            await asyncio.sleep(0.02)
    finally:
        await fleet.close()


async def test_a_create_retried_after_its_reply_was_lost_still_runs(redis_url: str) -> None:
    """The store retries a create whose reply was lost: the retry finds the record it wrote itself
    (not another client's), and the request must still be admitted and run."""
    worker = StubWorker("w0", step_s=0.01)
    fleet = await start_fleet(redis_url, [worker])
    store = fleet.server.store
    create = store.create_request

    async def reply_lost(record, score):  # type: ignore[no-untyped-def]
        await create(record, score)  # applied, but the caller never heard back...
        return await create(record, score)  # ...so the store's retry answers "exists"

    store.create_request = reply_lost  # type: ignore[method-assign]
    try:
        tokens, final = await asyncio.wait_for(
            collect(fleet.client.Generate(generate_request([2, 3], 12, request_id="lost-reply"))), 10
        )
        assert tokens == expected_tokens([2, 3], 12) and final.finish_reason == types_pb2.FINISH_REASON_LENGTH
    finally:
        await fleet.close()


async def test_a_policy_swap_ends_waiting_requests_that_can_never_fit(redis_url: str) -> None:
    """Under least-loaded a long request waits (host layers would hold it); a swap to fcfs-full,
    under which no worker could ever hold it, ends it at once with an error naming the limit."""
    from common.proto.layerkv.v1 import admin_pb2

    worker = StubWorker("w0", step_s=0.01)
    worker.gpu_blocks, worker.host_blocks = 192, 4096
    worker.refuse_next = 10**9  # keep it waiting
    fleet = await start_fleet(redis_url, [worker], policy="least-loaded")
    try:
        task = asyncio.ensure_future(collect(fleet.client.Generate(generate_request([7] * 1024, 128))))
        while not worker.refused:
            await asyncio.sleep(0.01)
        await fleet.admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=admin_pb2.PolicySpec(name="fcfs-full")))
        tokens, final = await asyncio.wait_for(task, 5)
        assert tokens == [] and final.finish_reason == types_pb2.FINISH_REASON_ERROR
        assert "GPU blocks" in final.error and "fcfs-full" in final.error
    finally:
        await fleet.close()
