"""AdminService and the operator CLI: policies (list/get/set, persisted, file-watched), workers
(list, drain, self-registration, DNS discovery) and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from common.proto.layerkv.v1 import admin_pb2, scheduler_pb2
from scheduler_svc.testing.fleet import Fleet, collect, generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def fleet(redis_url: str):
    fleet = await start_fleet(redis_url, [StubWorker("w0", gpu_blocks=128), StubWorker("w1", gpu_blocks=64)])
    yield fleet
    await fleet.close()


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    # subprocess.run in a thread, not asyncio's subprocess: uvloop spawns with fork(), whose child
    # runs gRPC's and torch's fork handlers and can crash before exec; subprocess uses vfork.
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "layerkv", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


async def test_policies_list_get_set_and_persist(fleet: Fleet) -> None:
    listed = await fleet.admin.ListPolicies(admin_pb2.ListPoliciesRequest())
    by_name = {p.name: p for p in listed.policies}
    assert {"fcfs-full", "least-loaded", "layerkv"} <= set(by_name)
    assert json.loads(by_name["least-loaded"].params_schema_json)["properties"]["skip_blocked"]
    assert by_name["least-loaded"].defaults["allow_host_layers"] is True
    spec = admin_pb2.PolicySpec(name="least-loaded")
    spec.params.update({"skip_blocked": True})
    resp = await fleet.admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=spec))
    assert resp.previous.name == "fcfs-full" and resp.current.name == "least-loaded"
    assert resp.current.params["skip_blocked"] is True
    got = await fleet.admin.GetPolicy(admin_pb2.GetPolicyRequest())
    assert got.policy.name == "least-loaded"
    await fleet.restart_scheduler()  # the policy stored in Redis wins over --policy fcfs-full
    got = await fleet.admin.GetPolicy(admin_pb2.GetPolicyRequest())
    assert got.policy.name == "least-loaded" and got.policy.params["skip_blocked"] is True


async def test_list_and_drain_workers(fleet: Fleet) -> None:
    workers = {
        w.worker_id: w for w in (await fleet.admin.ListWorkers(admin_pb2.ListWorkersRequest())).workers
    }
    assert set(workers) == {"w0", "w1"}
    w0 = workers["w0"]
    assert w0.healthy and not w0.draining and w0.model == "stub"
    assert (
        w0.geometry.num_layers == 4 and w0.gpu.total_blocks == 128 and len(w0.gpu.used_blocks_per_layer) == 4
    )
    assert w0.cost_model.correction == 1.0
    drained = await fleet.admin.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="w0"))
    assert drained.worker.draining
    results = await asyncio.gather(
        *(collect(fleet.client.Generate(generate_request([i + 1] * 3, 4))) for i in range(6))
    )
    assert all(len(tokens) == 4 for tokens, _ in results)
    assert fleet.workers[0].dispatched == [] and len(fleet.workers[1].dispatched) == 6


async def test_running_requests_and_reservations_are_visible(fleet: Fleet) -> None:
    fleet.workers[0].step_s = fleet.workers[1].step_s = 0.05
    call = fleet.client.Generate(generate_request([1] * 8, 20, request_id="vis"))
    async for _ in call:
        break
    workers = (await fleet.admin.ListWorkers(admin_pb2.ListWorkersRequest())).workers
    holder = [w for w in workers if "vis" in w.running_request_ids]
    assert len(holder) == 1
    w = holder[0]
    # The worker reports the blocks it holds (prompt and tokens so far, grown on demand); the
    # fcfs-full ledger keeps the rest of prompt + max_tokens (28 tokens: 7 blocks per layer) as
    # headroom, shown as reserved.
    assert 4 * 2 <= w.gpu.total_blocks - w.gpu.free_blocks < 4 * 7
    assert w.gpu.free_blocks - w.reserved_gpu_blocks == w.gpu.total_blocks - 4 * 7
    await fleet.client.Cancel(scheduler_pb2.CancelRequest(request_id="vis"))


async def test_self_registration_and_dns_discovery(redis_url: str) -> None:
    fleet = await start_fleet(redis_url, [])
    late = StubWorker("late")
    await late.start()
    dns = StubWorker("dns")
    await dns.start()
    try:
        resp = await fleet.admin.RegisterWorker(admin_pb2.RegisterWorkerRequest(address=late.address))
        assert resp.worker_id == "late"
        tokens, _ = await collect(fleet.client.Generate(generate_request([6, 6], 3)))
        assert tokens == expected_tokens([6, 6], 3) and late.dispatched
        stored = await fleet.server.store.workers()
        assert [(w.worker_id, w.address, w.registered) for w in stored] == [("late", late.address, True)]
        # a headless-Service name resolving to a worker's address (here: localhost)
        fleet.server.core.pool.start_dns(f"localhost:{dns.port}", 0.05)
        await fleet.wait_workers_up(2)
        assert fleet.server.core.pool.by_id("dns") is not None
        await fleet.restart_scheduler()  # the registered worker is remembered across restarts
        await fleet.wait_workers_up(1)
        assert fleet.server.core.pool.by_id("late") is not None
    finally:
        await fleet.close()
        await late.stop()
        await dns.stop()


async def test_policy_file_is_watched(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("name: least-loaded\nparams:\n  skip_blocked: true\n")
    fleet = await start_fleet(
        redis_url, [StubWorker("w0")], policy_file=str(path), policy_file_interval_s=0.05
    )
    try:
        for _ in range(100):
            if fleet.server.core.policy.name == "least-loaded":
                break
            await asyncio.sleep(0.02)
        assert fleet.server.core.policy.name == "least-loaded"
        path.write_text('{"name": "no-such-policy"}')  # a bad file is logged and ignored
        await asyncio.sleep(0.2)
        assert fleet.server.core.policy.name == "least-loaded"
        path.write_text('{"name": "fcfs-full", "params": {}}')
        for _ in range(100):
            if fleet.server.core.policy.name == "fcfs-full":
                break
            await asyncio.sleep(0.02)
        assert fleet.server.core.policy.name == "fcfs-full"
    finally:
        await fleet.close()


async def test_metrics_endpoint_exposes_latency_and_block_usage(redis_url: str) -> None:
    port = free_port()
    fleet = await start_fleet(redis_url, [StubWorker("w0")], metrics_port=port)
    try:
        await collect(fleet.client.Generate(generate_request([1, 2, 3], 5)))
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
        assert "layerkv_ttft_seconds_count 1.0" in text
        assert "layerkv_queue_seconds_count 1.0" in text
        assert "layerkv_tpot_seconds_count 1.0" in text
        assert 'layerkv_kv_blocks_used{layer="0",tier="gpu",worker="w0"}' in text
        assert "layerkv_queue_length 0.0" in text
        assert "layerkv_dispatches_refused_total" in text
    finally:
        await fleet.close()


async def test_cli_policy_and_workers_commands(fleet: Fleet) -> None:
    code, out, err = await cli("policy", "list", "--endpoint", fleet.address)
    assert code == 0, err
    assert "fcfs-full" in out and "least-loaded" in out
    code, out, err = await cli(
        "policy", "set", "least-loaded", "--params", '{"skip_blocked": true}', "--endpoint", fleet.address
    )
    assert code == 0, err
    assert json.loads(out)["previous"]["name"] == "fcfs-full"
    code, out, _ = await cli("policy", "get", "--endpoint", fleet.address)
    assert json.loads(out) == {
        "name": "least-loaded",
        "params": {"allow_host_layers": True, "skip_blocked": True},
    }
    code, out, err = await cli("policy", "set", "nope", "--endpoint", fleet.address)
    assert code == 1 and "unknown policy 'nope'" in err
    code, out, err = await cli("workers", "--json", "--endpoint", fleet.address)
    assert code == 0, err
    assert sorted(w["worker_id"] for w in json.loads(out)) == ["w0", "w1"]
    code, out, err = await cli("workers", "--endpoint", fleet.address, env={**os.environ, "COLUMNS": "200"})
    assert code == 0 and "w0" in out and "healthy" in out and "0/64" not in out and "64/64" in out
