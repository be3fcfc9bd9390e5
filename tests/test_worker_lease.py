"""The scheduler's lease on a worker: with no StreamEvents subscriber for a whole lease, the worker
aborts every running request and gives its blocks back; a subscriber back in time keeps them."""

from __future__ import annotations

import asyncio
import time

import grpc.aio

from common.config import WorkerSettings
from common.proto.layerkv.v1 import worker_pb2, worker_pb2_grpc
from tests.fleet import make_engine, proto_sampling
from worker_svc.server import create_server


async def _free_blocks(stub: worker_pb2_grpc.WorkerServiceStub) -> tuple[int, int, int]:
    """(free, total, running) from the state a fresh subscriber gets first."""
    events = stub.StreamEvents(worker_pb2.StreamEventsRequest())
    try:
        async for event in events:
            if event.HasField("gpu"):
                return event.gpu.free_blocks, event.gpu.total_blocks, len(event.running)
    finally:
        events.cancel()
    raise AssertionError("no state event")


async def test_requests_are_aborted_when_no_scheduler_holds_the_lease() -> None:
    engine = make_engine(gpu_blocks=600, host_blocks=64)
    settings = WorkerSettings.build(
        host="127.0.0.1", port=0, metrics_port=0, worker_id="w-lease", scheduler_lease_s=1.0
    )
    server, port = await create_server(settings, engine=engine)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    try:
        events = stub.StreamEvents(worker_pb2.StreamEventsRequest())
        await events.read()
        for i in range(1):
            await stub.Dispatch(
                worker_pb2.DispatchRequest(
                    request_id=f"held-{i}@0",
                    prompt_token_ids=[1, 2, 3],
                    sampling=proto_sampling(2000),
                    placement="GGGG",
                )
            )
        events.cancel()  # the scheduler goes away (it died, or declared this worker down)
        await asyncio.sleep(0.3)
        # a subscriber back within the lease keeps the requests running
        free, total, running = await _free_blocks(stub)
        assert running == 1 and free < total
        deadline = time.monotonic() + 20
        while True:
            await asyncio.sleep(1.5)  # longer than the lease, with nobody subscribed
            free, total, running = await _free_blocks(stub)
            if running == 0:
                break
            assert time.monotonic() < deadline, f"still {running} running after the lease ran out"
        assert free == total and server.servicer.leases_expired >= 1
    finally:
        await channel.close(None)
        await server.stop(0)
