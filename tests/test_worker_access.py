"""A worker answers only its scheduler, on every RPC, and checks that before decoding anything.

A real tiny-llama worker in-process on port 0 and a real scheduler (real Redis) that reaches it
with the worker token; callers without the token or with another certificate name are refused on
Describe, GetTokenizer, Dispatch, StreamEvents and Abort alike.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from common.config import SchedulerSettings, WorkerSettings
from common.proto.layerkv.v1 import worker_pb2, worker_pb2_grpc
from common.security import bearer_metadata, open_channel
from scheduler_svc.server import create_server as create_scheduler
from scheduler_svc.testing.fleet import collect
from tests.fleet import make_engine, proto_sampling
from tests.pki import make_pki, tls_credentials
from tests.streams import token_request
from worker_svc.server import WorkerServer, create_server

WORKER_TOKEN = "worker-secret"
SERVICE = "/layerkv.v1.WorkerService/"


def _calls(stub: worker_pb2_grpc.WorkerServiceStub) -> dict[str, Callable[..., Any]]:
    """One valid request per WorkerService RPC (StreamEvents is read to its first message)."""
    dispatch = worker_pb2.DispatchRequest(
        request_id="acc", prompt_token_ids=[1, 2], sampling=proto_sampling(2), placement="GGGG"
    )

    async def first_event(**kw: Any) -> Any:
        call = stub.StreamEvents(worker_pb2.StreamEventsRequest(), **kw)
        try:
            async for event in call:
                return event
        finally:
            call.cancel()

    return {
        "Describe": lambda **kw: stub.Describe(worker_pb2.DescribeRequest(), **kw),
        "GetTokenizer": lambda **kw: stub.GetTokenizer(worker_pb2.GetTokenizerRequest(), **kw),
        "Dispatch": lambda **kw: stub.Dispatch(dispatch, **kw),
        "StreamEvents": first_event,
        "Abort": lambda **kw: stub.Abort(worker_pb2.AbortRequest(request_id="acc"), **kw),
    }


async def _worker(**settings: object) -> WorkerServer:
    server, _ = await create_server(
        WorkerSettings.build(host="127.0.0.1", port=0, metrics_port=0, worker_id="w-acc", **settings),
        engine=make_engine(gpu_blocks=64, host_blocks=64),
    )
    return server


@pytest.fixture
async def token_worker() -> AsyncIterator[WorkerServer]:
    server = await _worker(worker_token=WORKER_TOKEN)
    yield server
    await server.stop(0)


async def test_every_worker_rpc_needs_the_worker_token(token_worker: WorkerServer) -> None:
    address = f"127.0.0.1:{token_worker.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        for name, call in _calls(stub).items():
            for metadata, what in (((), "missing"), (bearer_metadata("not-it"), "wrong")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert f"{what} bearer token for layerkv.v1.WorkerService" in (err.value.details() or "")
        # Undecodable bytes without the token: refused for the token, never parsed.
        raw = channel.unary_unary(SERVICE + "Dispatch")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A channel that carries the token reaches every RPC (Dispatch then Abort frees the blocks).
    async with open_channel(address, token=WORKER_TOKEN) as channel:
        calls = _calls(worker_pb2_grpc.WorkerServiceStub(channel))
        assert (await calls["Describe"](timeout=10)).vocab_size == 258
        assert (await calls["GetTokenizer"](timeout=10)).kind
        assert (await calls["Dispatch"](timeout=10)).gpu_blocks > 0
        assert await calls["StreamEvents"](timeout=10) is not None
        # The request may have finished by now (aborted false): what matters is the answer.
        assert isinstance(await calls["Abort"](timeout=10), worker_pb2.AbortResponse)


async def test_mutual_tls_identity_guards_describe_and_get_tokenizer_too(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = await _worker(
        tls_cert=pki.worker.cert, tls_key=pki.worker.key, tls_ca=pki.ca, scheduler_identity="scheduler"
    )
    address = f"127.0.0.1:{server.port}"
    try:
        # Same CA, another name: refused on every RPC, reads included.
        async with grpc.aio.secure_channel(address, tls_credentials(pki.ca, pki.intruder)) as channel:
            for name, call in _calls(worker_pb2_grpc.WorkerServiceStub(channel)).items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(timeout=10)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        async with grpc.aio.secure_channel(address, tls_credentials(pki.ca, pki.scheduler)) as channel:
            calls = _calls(worker_pb2_grpc.WorkerServiceStub(channel))
            assert (await calls["Describe"](timeout=10)).worker_id == "w-acc"
            assert (await calls["GetTokenizer"](timeout=10)).kind
    finally:
        await server.stop(0)


async def test_scheduler_reaches_a_token_worker(token_worker: WorkerServer, redis_url: str) -> None:
    settings = SchedulerSettings.build(
        host="127.0.0.1", port=0, metrics_port=0, redis_url=redis_url, policy="fcfs-full",
        workers=[f"127.0.0.1:{token_worker.port}"], worker_token=WORKER_TOKEN, worker_retry_s=0.2,
    )  # fmt: skip
    scheduler, port = await create_scheduler(settings)
    try:
        handle = scheduler.core.pool.handles()[0]
        await scheduler.core.pool.add_and_wait(handle.address, timeout_s=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            from common.proto.layerkv.v1 import scheduler_pb2_grpc

            client = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            tokens, final = await collect(client.Generate(token_request([1, 2, 3], 4), timeout=60))
            assert len(tokens) == 4 and final is not None
    finally:
        await scheduler.stop(0)


async def test_out_of_vocabulary_prompts_are_refused_before_the_stream(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker = await _worker()
    settings = SchedulerSettings.build(
        host="127.0.0.1", port=0, metrics_port=0, redis_url=redis_url, policy="fcfs-full",
        workers=[f"127.0.0.1:{worker.port}"], worker_retry_s=0.2,
    )  # fmt: skip
    scheduler, port = await create_scheduler(settings)
    try:
        handle = scheduler.core.pool.handles()[0]
        await scheduler.core.pool.add_and_wait(handle.address, timeout_s=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            from common.proto.layerkv.v1 import scheduler_pb2_grpc

            client = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            tokens, final = await collect(client.Generate(token_request([1, 2, 3], 4), timeout=60))
            assert len(tokens) == 4 and final is not None
            # Out of the vocabulary (258 ids): a status before the stream starts, not an OK stream
            # that ends in an error.
            call = client.Generate(token_request([1, 258, 7], 4), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "outside the vocabulary [0, 258)" in (err.value.details() or "")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await scheduler.stop(0)
        await worker.stop(0)
