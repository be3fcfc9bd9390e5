"""End to end: the waiting-queue limit (RESOURCE_EXHAUSTED) and no healthy worker (UNAVAILABLE).

One worker with room for exactly one long request (``--gpu-blocks`` 4 layers x 63 blocks) and a
scheduler with ``--queue-limit 2`` under the baseline policy: one request runs, two wait, the
next is refused; once the worker is gone, requests are refused as UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio

from common.proto.layerkv.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2
from tests.fleet import RedisProcess, start_fleet, wait_workers_healthy
from tests.streams import Streamed, token_request

LONG = 1000  # output tokens: 8 + 1000 tokens = 63 blocks per layer


async def _status_of_generate(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, req: scheduler_pb2.GenerateRequest
) -> grpc.StatusCode:
    try:
        async for _ in stub.Generate(req, timeout=30):
            pass
    except grpc.aio.AioRpcError as err:
        assert err.details(), "the status carries a message"
        return err.code()
    return grpc.StatusCode.OK


async def test_queue_limit_then_no_healthy_worker(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path)
    fleet = start_fleet(
        tmp_path,
        redis.url,
        num_workers=1,
        self_register=False,
        gpu_blocks=4 * 63,
        host_blocks=0,
        scheduler_args=["--queue-limit", "2", "--policy", "fcfs-full"],
    )
    try:
        async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            prompt = [256, 1, 2, 3, 4, 5, 6, 7]
            running = stub.Generate(token_request(prompt, LONG, request_id="holder"))
            seen = Streamed(request_id="holder")
            async for msg in running:
                seen.take(msg)
                if seen.token_ids:
                    break
            waiting = [stub.Generate(token_request(prompt, LONG, request_id=f"wait-{i}")) for i in range(2)]
            for i in range(2):
                for _ in range(200):
                    try:
                        info = await stub.GetRequest(scheduler_pb2.GetRequestRequest(request_id=f"wait-{i}"))
                        if info.request.status == scheduler_pb2.REQUEST_STATUS_WAITING:
                            break
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"wait-{i} never showed up as waiting")
            assert await _status_of_generate(stub, token_request(prompt, LONG)) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            # The refused request disturbed nothing: the holder keeps streaming.
            async for msg in running:
                seen.take(msg)
                if len(seen.token_ids) >= 20:
                    break
            for rid in ("wait-0", "wait-1", "holder"):
                assert (await stub.Cancel(scheduler_pb2.CancelRequest(request_id=rid))).cancelled
            for call in waiting:
                finals = [m.final for m in [m async for m in call] if m.HasField("final")]
                assert finals and finals[-1].finish_reason == types_pb2.FINISH_REASON_ABORT

            fleet.workers[0].kill()
            for _ in range(200):
                try:
                    wait_workers_healthy(fleet.scheduler.address, 1, timeout_s=0.1)
                except RuntimeError:
                    break  # no healthy worker any more
                await asyncio.sleep(0.05)
            assert await _status_of_generate(stub, token_request([256, 1], 4)) == grpc.StatusCode.UNAVAILABLE
    finally:
        fleet.stop()
        redis.stop()
