"""Client-side races with real processes: a Cancel right behind its Generate, a client that goes
away mid-stream. Both must end the request on the worker (blocks back), not run to max_tokens."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest

from common.proto.layerkv.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.faults.harness import FaultFleet, Job, assert_healed, wait_tokens
from tests.streams import Streamed

pytestmark = pytest.mark.slow

LONG = 1500  # long enough that running to max_tokens would show


def _long(job: Job) -> scheduler_pb2.GenerateRequest:
    request = job.request()
    request.sampling.max_tokens = LONG
    return request


async def test_cancel_immediately_after_generate(fleet: FaultFleet) -> None:
    async with grpc.aio.insecure_channel(fleet.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        for i in range(8):
            job = Job(f"cancel-{i}", (30 + i, 31, 32))
            call = stub.Generate(_long(job), timeout=60)
            cancelled = None
            deadline = time.monotonic() + 5
            while cancelled is None:  # the first Cancel may beat the Generate to the scheduler
                try:
                    reply = await stub.Cancel(
                        scheduler_pb2.CancelRequest(request_id=job.request_id), timeout=5
                    )
                    cancelled = reply.cancelled
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND, err
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0)
            assert cancelled, f"{job.request_id}: Cancel right after Generate answered cancelled=false"
            seen = Streamed(request_id=job.request_id)
            async for msg in call:
                seen.take(msg)
            assert seen.final is not None and seen.final.finish_reason == types_pb2.FINISH_REASON_ABORT
            assert len(seen.token_ids) < LONG
    await asyncio.to_thread(assert_healed, fleet, 30)


async def test_client_disconnect_mid_stream_cancels_the_request(fleet: FaultFleet) -> None:
    job = Job("gone-0", (41, 42, 43, 44))
    async with grpc.aio.insecure_channel(fleet.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        call = stub.Generate(_long(job), timeout=120)
        got = 0
        async for msg in call:
            got += len(msg.chunk.token_ids)
            if got >= 3:
                break
        call.cancel()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while True:
        info = fleet.request_info(job.request_id)
        if info.status == scheduler_pb2.REQUEST_STATUS_FINISHED:
            break
        assert time.monotonic() < deadline, "the abandoned request kept running"
        await asyncio.sleep(0.1)
    assert info.finish_reason == types_pb2.FINISH_REASON_ABORT and info.output_tokens < LONG
    await asyncio.to_thread(assert_healed, fleet, 30)


async def test_client_deadline_cancels_the_request(fleet: FaultFleet) -> None:
    job = Job("late-0", (51, 52, 53))
    await asyncio.sleep(0)
    async with grpc.aio.insecure_channel(fleet.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(_long(job), timeout=1.5):
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_tokens(fleet, job.request_id, 1, 5)
    deadline = time.monotonic() + 30
    while fleet.request_info(job.request_id).status != scheduler_pb2.REQUEST_STATUS_FINISHED:
        assert time.monotonic() < deadline, "a request past its client's deadline kept running"
        await asyncio.sleep(0.1)
    assert fleet.request_info(job.request_id).output_tokens < LONG
    await asyncio.to_thread(assert_healed, fleet, 30)
