"""End to end with TLS and tokens: a scheduler and a worker with mutual TLS between them.

The worker registers itself with the scheduler over TLS, with the admin token.

The CA and certificates are made in the test (``cryptography``). A client without the admin
token cannot call Admin; a plaintext or wrongly-certified peer cannot reach the worker; the
scheduler itself (its certificate's name is the worker's ``--scheduler-identity``) can.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from common.security import bearer_metadata
from common.types import SamplingParams
from tests.fleet import (
    REPO_ROOT,
    RedisProcess,
    ServiceProcess,
    free_port,
    make_engine,
    proto_sampling,
    reference_outputs,
    scheduler_process,
    wait_workers_healthy,
    worker_process,
)
from tests.pki import Pki, make_pki, tls_credentials
from tests.streams import stream_generate, token_request

ADMIN_TOKEN = "admin-secret"
API_TOKEN = "api-secret"


@dataclass
class SecureFleet:
    pki: Pki
    scheduler: ServiceProcess
    worker: ServiceProcess


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFleet]:
    tmp: Path = tmp_path_factory.mktemp("secure")
    pki = make_pki(tmp / "pki")
    redis = RedisProcess(tmp)
    sched_port = free_port()
    # The worker registers itself over TLS with the admin token (RegisterWorker is an Admin call).
    worker = worker_process(
        tmp,
        "worker-tls",
        "--tls-cert",
        pki.worker.cert,
        "--tls-key",
        pki.worker.key,
        "--tls-ca",
        pki.ca,
        "--scheduler-identity",
        "scheduler",
        "--admin-token",
        ADMIN_TOKEN,
        scheduler=f"127.0.0.1:{sched_port}",
    )
    scheduler = scheduler_process(
        tmp,
        redis.url,
        "--tls-cert",
        pki.scheduler.cert,
        "--tls-key",
        pki.scheduler.key,
        "--tls-ca",
        pki.ca,
        "--admin-token",
        ADMIN_TOKEN,
        "--api-token",
        API_TOKEN,
        port=sched_port,
    )
    worker.start()
    scheduler.start()
    try:
        worker.wait_serving(120, credentials=tls_credentials(pki.ca, pki.scheduler))
        scheduler.wait_serving(120, credentials=tls_credentials(pki.ca))
        with grpc.secure_channel(scheduler.address, tls_credentials(pki.ca)) as ch:
            wait_workers_healthy(scheduler.address, 1, admin_token=ADMIN_TOKEN, channel=ch)
        yield SecureFleet(pki, scheduler, worker)
    finally:
        worker.stop()
        scheduler.stop()
        redis.stop()


async def test_admin_needs_the_token(secure: SecureFleet) -> None:
    async with grpc.aio.secure_channel(secure.scheduler.address, tls_credentials(secure.pki.ca)) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        for metadata in ((), bearer_metadata("wrong"), bearer_metadata(API_TOKEN)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.ListWorkers(admin_pb2.ListWorkersRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.SetPolicy(
                    admin_pb2.SetPolicyRequest(policy=admin_pb2.PolicySpec(name="fcfs-full")),
                    metadata=metadata,
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await admin.ListWorkers(admin_pb2.ListWorkersRequest(), metadata=bearer_metadata(ADMIN_TOKEN))
        assert [w.healthy for w in reply.workers] == [True]


async def test_generate_over_tls_with_the_api_token_reaches_the_mtls_worker(secure: SecureFleet) -> None:
    async with grpc.aio.secure_channel(secure.scheduler.address, tls_credentials(secure.pki.ca)) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream_generate(stub, token_request([256, 1, 2], 4))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        got = await stream_generate(stub, token_request([256, 1, 2], 6), metadata=bearer_metadata(API_TOKEN))
    want = reference_outputs(make_engine(), [[256, 1, 2]], SamplingParams(max_tokens=6, ignore_eos=True))
    assert got.token_ids == want[0]


async def test_a_plaintext_client_cannot_reach_the_scheduler(secure: SecureFleet) -> None:
    async with grpc.aio.insecure_channel(secure.scheduler.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin_pb2_grpc.AdminServiceStub(ch).ListWorkers(
                admin_pb2.ListWorkersRequest(), metadata=bearer_metadata(ADMIN_TOKEN), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_only_the_scheduler_reaches_the_worker(secure: SecureFleet) -> None:
    pki, address = secure.pki, secure.worker.address
    dispatch = worker_pb2.DispatchRequest(
        request_id="intruder-1", prompt_token_ids=[256, 1], sampling=proto_sampling(2), placement="GGGG"
    )
    # Plaintext, no client certificate, and the right name signed by another CA: no connection.
    for channel in (
        grpc.aio.insecure_channel(address),
        grpc.aio.secure_channel(address, tls_credentials(pki.ca)),
        grpc.aio.secure_channel(address, tls_credentials(pki.ca, pki.rogue)),
    ):
        async with channel as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await worker_pb2_grpc.WorkerServiceStub(ch).Dispatch(dispatch, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A certificate of the same CA with another name: connected, but refused.
    async with grpc.aio.secure_channel(address, tls_credentials(pki.ca, pki.intruder)) as ch:
        stub = worker_pb2_grpc.WorkerServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Dispatch(dispatch, timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.StreamEvents(worker_pb2.StreamEventsRequest(), timeout=5):
                pass
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_generate_cli_over_tls_needs_the_api_token(secure: SecureFleet) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERKV_")}
    base = [
        sys.executable,
        "-m",
        "layerkv",
        "generate",
        "--endpoint",
        secure.scheduler.address,
        "--tls-ca",
        secure.pki.ca,
        "--json",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "over TLS",
    ]
    ok = subprocess.run(
        [*base, "--api-token", API_TOKEN], capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    record = json.loads(ok.stdout.strip().splitlines()[-1])
    assert len(record["token_ids"]) == 4 and record["finish_reason"] == "length"
    denied = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert denied.returncode == 1
    assert "Unauthenticated" in denied.stdout + denied.stderr


async def test_the_worker_stops_gracefully_on_sigterm(secure: SecureFleet) -> None:
    """Last in the module: SIGTERM ends the worker with exit code 0, and the scheduler notices."""
    assert secure.worker.stop() == 0, secure.worker.log_tail()
    async with grpc.aio.secure_channel(secure.scheduler.address, tls_credentials(secure.pki.ca)) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        for _ in range(200):
            reply = await admin.ListWorkers(
                admin_pb2.ListWorkersRequest(), metadata=bearer_metadata(ADMIN_TOKEN)
            )
            if not any(w.healthy for w in reply.workers):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the scheduler still lists the stopped worker as healthy")
