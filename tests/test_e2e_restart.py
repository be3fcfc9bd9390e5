"""End to end: the scheduler process restarts mid-load and every request still completes.

Clients lose their streams when the scheduler goes away; they re-attach to the new scheduler
process (same address, same Redis) from the offset they reached, as a real client would.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.proto.layerkv.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2
from common.types import SamplingParams
from tests.fleet import RedisProcess, make_engine, reference_outputs, start_fleet
from tests.streams import Streamed, stream_attach, token_request

pytestmark = pytest.mark.slow

MAX_TOKENS = 300


def _first_diff(got: list[int], want: list[int]) -> int:
    return next(
        (j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
    )


async def _until_done(address: str, request: scheduler_pb2.GenerateRequest, deadline: float) -> Streamed:
    """What a careful client does: Generate; on a broken stream re-attach from its offset (retrying
    while the scheduler is away); when the scheduler never stored the request (NOT_FOUND on Attach:
    it died before the create), send the same Generate again (same id: it cannot run twice)."""
    seen = Streamed(request_id=request.request_id)
    submit = True
    while seen.final is None:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{request.request_id} unfinished at the deadline ({len(seen.token_ids)} tokens)"
            )
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
                if submit:
                    async for msg in stub.Generate(request, timeout=120):
                        seen.take(msg)
                else:
                    await stream_attach(stub, request.request_id, seen)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND and not submit and not seen.token_ids:
                submit = True
                continue
            if err.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.UNKNOWN,
            ):
                raise
            await asyncio.sleep(0.2)
            submit = False
    return seen


async def test_restarting_the_scheduler_mid_load_completes_every_request(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path)
    fleet = start_fleet(tmp_path, redis.url, num_workers=2, self_register=False)
    try:
        rng = random.Random(4)
        prompts = [[256, *(rng.randrange(256) for _ in range(rng.randint(1, 30)))] for _ in range(30)]
        deadline = time.monotonic() + 240
        tasks = [
            asyncio.create_task(
                _until_done(
                    fleet.scheduler.address, token_request(p, MAX_TOKENS, request_id=f"rs-{i}"), deadline
                )
            )
            for i, p in enumerate(prompts)
        ]
        # Once tokens flow, crash the scheduler (SIGKILL: nothing is flushed) and start the same
        # command line again: it must reload waiting and running requests from Redis.
        async with grpc.aio.insecure_channel(fleet.scheduler.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            for _ in range(600):
                try:
                    info = await stub.GetRequest(scheduler_pb2.GetRequestRequest(request_id="rs-0"))
                    if info.request.output_tokens > 0:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)
        old_pid = fleet.scheduler.pid
        await asyncio.to_thread(fleet.scheduler.kill)
        fleet.scheduler.start()
        assert fleet.scheduler.pid != old_pid
        await asyncio.to_thread(fleet.scheduler.wait_serving, 120)
        try:
            results = await asyncio.gather(*tasks)
        except BaseException as exc:  # keep the scheduler's side of the story in the report
            raise AssertionError(f"{exc!r}\nscheduler log:\n{fleet.scheduler.log_tail(60)}") from exc
        want = reference_outputs(
            make_engine(), prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        )
        for i, (r, w) in enumerate(zip(results, want, strict=True)):
            assert r.token_ids == w, (
                f"rs-{i}: {len(r.token_ids)} tokens, first wrong at {_first_diff(r.token_ids, w)}"
            )
        assert all(r.final.finish_reason == types_pb2.FINISH_REASON_LENGTH for r in results)
    finally:
        fleet.stop()
        redis.stop()
