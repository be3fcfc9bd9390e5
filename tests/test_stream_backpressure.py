"""GenerateStream against a real gRPC client that stops reading: the stream's outbox stays bounded
while the client is behind, and once a message stays unsent past the limit the stream's requests
are cancelled (their blocks freed) and the call ends with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.config import SchedulerSettings
from common.proto.layerkv.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.multiplex import StreamLimits
from scheduler_svc.testing.fleet import generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker

REPO = Path(__file__).resolve().parent.parent


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="outbox_events"):
        StreamLimits(outbox_events=0)
    with pytest.raises(ValueError, match="stall_timeout_s"):
        StreamLimits(stall_timeout_s=0.0)


@pytest.mark.parametrize(
    "flag, value, fragment",
    [("--stream-outbox-events", "0", "stream_outbox_events"),
     ("--stream-stall-timeout-s", "0", "stream_stall_timeout_s"),
     ("--stream-stall-timeout-s", "soon", "valid number")],
)  # fmt: skip
def test_the_scheduler_cli_rejects_bad_stream_limits(flag: str, value: str, fragment: str) -> None:
    """`layerkv scheduler` names the bad limit and exits before it starts anything."""
    proc = subprocess.run(
        [sys.executable, "-m", "layerkv", "scheduler", "--redis-url", "redis://127.0.0.1:1/0", flag, value],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert fragment in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_the_stream_limits_are_scheduler_settings() -> None:
    env = {"LAYERKV_STREAM_OUTBOX_EVENTS": "64", "LAYERKV_STREAM_STALL_TIMEOUT_S": "5.5"}
    settings = SchedulerSettings.from_env(env)
    assert (settings.stream_outbox_events, settings.stream_stall_timeout_s) == (64, 5.5)
    defaults = SchedulerSettings.build()
    assert StreamLimits(defaults.stream_outbox_events, defaults.stream_stall_timeout_s) == StreamLimits()


async def test_a_client_that_stops_reading_is_bounded_then_cancelled(redis_url: str) -> None:
    worker = StubWorker("w0", step_s=0.001, gpu_blocks=1 << 20, host_blocks=1 << 20)
    # The limits as an operator sets them (--stream-outbox-events / --stream-stall-timeout-s).
    fleet = await start_fleet(redis_url, [worker], stream_outbox_events=16, stream_stall_timeout_s=2.0)
    try:
        servicer = fleet.server.servicer
        assert servicer.stream_limits == StreamLimits(outbox_events=16, stall_timeout_s=2.0)
        # A client with HTTP/2's initial 64 KiB window (no BDP probing to widen it): its transport
        # takes that much, then nothing until it reads.
        channel = grpc.aio.insecure_channel(fleet.address, options=[("grpc.http2.bdp_probe", 0)])
        client = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        call = client.GenerateStream()
        requests = [(t, generate_request([3 + t % 50] * 4, 4000)) for t in range(128)]
        await call.write(scheduler_pb2.GenerateStreamRequest(
            requests=[scheduler_pb2.TaggedGenerateRequest(tag=t, request=r) for t, r in requests]
        ))  # fmt: skip
        # The client reads nothing from here on.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not servicer.streams:
            assert loop.time() < deadline, "the stream never opened"
            await asyncio.sleep(0.01)
        (session,) = servicer.streams
        while not session.stalled:
            assert loop.time() < deadline, "the stream never noticed the client stopped reading"
            assert len(session._outbox) <= 16, len(session._outbox)
            await asyncio.sleep(0.01)
        assert session.most_queued <= 16, session.most_queued
        core = fleet.server.core
        ids = [rid for rid, s in core.requests.items()]
        assert len(ids) == 128
        while not all(core.requests[rid].finished for rid in ids):
            assert loop.time() < deadline, "the stalled stream's requests were not cancelled"
            await asyncio.sleep(0.01)
        assert {core.requests[rid].record.finish_reason for rid in ids} == {"abort"}
        assert max(len(core.requests[rid].tokens) for rid in ids) < 4000  # cut short
        while worker.running_ids:
            assert loop.time() < deadline, "the worker still runs them"
            await asyncio.sleep(0.01)
        assert worker.gpu_free == worker.gpu_blocks
        # The client, reading at last, gets what was sent, then the status.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while (await asyncio.wait_for(call.read(), 30)) is not grpc.aio.EOF:
                pass
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value
        assert "read nothing" in (raised.value.details() or "")
        assert not servicer.streams
        await channel.close()
    finally:
        await fleet.close()
