"""The scheduler's gRPC edge against bad input: documented statuses, bounded logs, no dead ends.

A real scheduler (real Redis, stub workers) on port 0: undecodable bytes and bad tokens
(auth before decoding, one rate-limited log line each, no traceback), invalid UTF-8, NaN and
Infinity policy parameters, oversized ids, malformed or dead worker registrations, and undrain.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from common.proto.layerkv.v1 import admin_pb2, scheduler_pb2
from common.security import bearer_metadata
from scheduler_svc.testing.fleet import Fleet, collect, generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens
from tests.test_scheduler_admin import cli

API_TOKEN = "api-secret"
GENERATE = "/layerkv.v1.SchedulerService/Generate"
GET_REQUEST = "/layerkv.v1.SchedulerService/GetRequest"


@pytest.fixture
async def fleet(redis_url: str) -> AsyncIterator[Fleet]:
    fleet = await start_fleet(redis_url, [StubWorker("w0")])
    yield fleet
    await fleet.close()


def _code(err: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> grpc.StatusCode:
    return err.value.code()


async def _raw_unary(channel: grpc.aio.Channel, method: str, payload: bytes, token: str = "") -> None:
    await channel.unary_unary(method)(payload, metadata=bearer_metadata(token), timeout=10)


def _edge_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "common.grpc_errors"]


async def test_undecodable_and_unauthenticated_calls_log_one_line_each_without_tracebacks(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common import grpc_errors
    from common.logging_setup import RateLimitedLog

    # A fresh budget: earlier tests in this process may have spent the current window's.
    fresh = RateLimitedLog(grpc_errors.log, burst=10, window_s=10.0)
    monkeypatch.setattr(grpc_errors, "bad_input_log", fresh)
    fleet = await start_fleet(redis_url, [StubWorker("w0")], api_token=API_TOKEN)
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _raw_unary(fleet.channel, GET_REQUEST, b"\xff\xff\xff\xff", token=API_TOKEN)
        assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in (err.value.details() or "")
        edge = _edge_records(caplog)
        assert len(edge) == 1 and "undecodable" in edge[0].getMessage() and edge[0].exc_info is None
        # A wrong token is refused before the bytes are looked at: UNAUTHENTICATED, not INVALID_ARGUMENT.
        caplog.clear()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _raw_unary(fleet.channel, GET_REQUEST, b"\xff\xff\xff\xff", token="wrong")
        assert _code(err) == grpc.StatusCode.UNAUTHENTICATED
        refused = [r.getMessage().split(" from ")[0] for r in _edge_records(caplog)]
        assert refused == [f"refused {GET_REQUEST}"]
        # A flood: at most one line per message, and a bounded number in all (rate-limited).
        caplog.clear()
        for i in range(40):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _raw_unary(fleet.channel, GENERATE, bytes([0xFF, i]) * 3, token=API_TOKEN)
            assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
        written = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert 1 <= len(written) <= 10  # the limiter's burst
        assert all(r.exc_info is None for r in caplog.records)
        # The service keeps serving.
        tokens, _ = await collect(
            fleet.client.Generate(generate_request([5, 6], 3), metadata=bearer_metadata(API_TOKEN))
        )
        assert tokens == expected_tokens([5, 6], 3)
    finally:
        await fleet.close()


def test_rate_limited_log_counts_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    from common.logging_setup import RateLimitedLog

    now = [0.0]
    logger = logging.getLogger("test.ratelimit")
    limited = RateLimitedLog(logger, burst=2, window_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="test.ratelimit")
    written = [limited.log(logging.WARNING, "bad %d", i) for i in range(5)]
    assert written == [True, True, False, False, False]
    now[0] = 10.0  # the next window
    assert limited.log(logging.WARNING, "bad %d", 5)
    assert [r.getMessage() for r in caplog.records] == [
        "bad 0", "bad 1", "bad 5 (3 similar lines suppressed before this one)"
    ]


async def test_invalid_utf8_text_is_invalid_argument(fleet: Fleet) -> None:
    # GenerateRequest.text is field 2 (length-delimited): bytes that are not UTF-8.
    payload = bytes([0x12, 0x02, 0xC3, 0x28])
    call = fleet.channel.unary_stream(GENERATE)(payload, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_set_policy_with_a_non_finite_parameter_is_invalid_argument(fleet: Fleet, bad: float) -> None:
    spec = admin_pb2.PolicySpec(name="least-loaded")
    spec.params.update({"skip_blocked": True, "nested": {"weight": bad}})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=spec))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "'nested'.weight must be a finite number" in (err.value.details() or "")
    got = await fleet.admin.GetPolicy(admin_pb2.GetPolicyRequest())
    assert got.policy.name == "fcfs-full"  # unchanged


async def test_an_oversized_unknown_id_stays_not_found(fleet: Fleet) -> None:
    huge = "x" * 20_000
    calls = (
        fleet.client.GetRequest(scheduler_pb2.GetRequestRequest(request_id=huge), timeout=10),
        fleet.client.Cancel(scheduler_pb2.CancelRequest(request_id=huge), timeout=10),
        fleet.client.Attach(scheduler_pb2.AttachRequest(request_id=huge), timeout=10).read(),
        fleet.admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id=huge), timeout=10),
    )
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert _code(err) == grpc.StatusCode.NOT_FOUND
        assert len(err.value.details() or "") < 1100


@pytest.mark.parametrize(
    "address", ["127.0.0.1:70000", "127.0.0.1:0", ":50061", "worker-0:", "worker-0", "bad host:50061",
                "127.0.0.1:5a", "x" * 300 + ":1"],
)
async def test_register_worker_refuses_a_malformed_address(fleet: Fleet, address: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.admin.RegisterWorker(admin_pb2.RegisterWorkerRequest(address=address), timeout=5)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "worker address" in (err.value.details() or "")
    assert all(h.address != address for h in fleet.server.core.pool.handles())


async def test_a_dead_registered_worker_is_dropped_with_one_log_line(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = await start_fleet(redis_url, [StubWorker("w0")], registered_worker_ttl_s=1.0)
    try:
        await _dead_registration_is_dropped(fleet, caplog)
    finally:
        await fleet.close()


async def _dead_registration_is_dropped(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    late = StubWorker("late")
    await late.start()
    resp = await fleet.admin.RegisterWorker(admin_pb2.RegisterWorkerRequest(address=late.address), timeout=10)
    assert resp.worker_id == "late"
    assert [w.address for w in await fleet.server.store.workers()] == [late.address]
    caplog.set_level(logging.DEBUG)
    await late.stop()
    pool = fleet.server.core.pool
    for _ in range(300):  # the pool redials every 0.2 s and gives up after registered_worker_ttl_s
        if all(h.address != late.address for h in pool.handles()):
            break
        await asyncio.sleep(0.05)
    assert all(h.address != late.address for h in pool.handles()), "the dead address is still dialled"
    assert await fleet.server.store.workers() == []
    pool_records = [r for r in caplog.records if r.name == "scheduler_svc.worker_pool"]
    warnings = [r for r in pool_records if r.levelno >= logging.WARNING]
    # one line when it went down, one when it was dropped; the redials in between are DEBUG
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    assert "dropped until it registers again" in warnings[-1].getMessage()
    assert [r for r in pool_records if r.levelno == logging.DEBUG]  # it did redial before giving up
    # An unknown address that never answers is not kept either.
    dead = f"127.0.0.1:{late.port}"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.admin.RegisterWorker(admin_pb2.RegisterWorkerRequest(address=dead), timeout=1.0)
    assert _code(err) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    for _ in range(100):
        if all(h.address != dead for h in pool.handles()):
            break
        await asyncio.sleep(0.05)
    assert all(h.address != dead for h in pool.handles())


async def test_undrain_resumes_dispatching(fleet: Fleet) -> None:
    drained = await fleet.admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="w0"))
    assert drained.worker.draining
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the only worker is draining
        await collect(fleet.client.Generate(generate_request([3, 4], 3)))
    assert _code(err) == grpc.StatusCode.UNAVAILABLE
    undrained = await fleet.admin.UndrainWorker(admin_pb2.UndrainWorkerRequest(worker_id="w0"))
    assert not undrained.worker.draining
    tokens, final = await collect(fleet.client.Generate(generate_request([3, 4], 3)))
    assert tokens == expected_tokens([3, 4], 3) and final is not None
    assert len(fleet.workers[0].dispatched) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.admin.UndrainWorker(admin_pb2.UndrainWorkerRequest(worker_id="nobody"))
    assert _code(err) == grpc.StatusCode.NOT_FOUND


async def test_workers_drain_and_undrain_cli(fleet: Fleet) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERKV_")}
    code, out, err = await cli("workers", "drain", "w0", "--endpoint", fleet.address, env=env)
    assert code == 0, err
    assert out.split() == ["w0", "draining"]
    assert fleet.server.core.pool.by_id("w0").draining  # type: ignore[union-attr]
    code, out, err = await cli("workers", "undrain", "w0", "--endpoint", fleet.address, env=env)
    assert code == 0, err
    assert out.split() == ["w0", "accepting"]
    assert not fleet.server.core.pool.by_id("w0").draining  # type: ignore[union-attr]
