"""``layerkv bench --endpoint`` end to end against a fake scheduler (sync gRPC server in threads)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from layerkv.cli import app


class FakeFleet(scheduler_pb2_grpc.SchedulerServiceServicer, admin_pb2_grpc.AdminServiceServicer):
    """Answers every request with its max_tokens tokens; 'slow' policies wait before the first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.policy = "fcfs-full"
        self.policies_set: list[tuple[str, dict[str, object]]] = []
        self.prompts: dict[str, list[tuple[int, ...]]] = {}

    def Generate(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            policy = self.policy
            self.prompts.setdefault(policy, []).append(tuple(request.token_ids.ids))
        n = request.sampling.max_tokens
        yield scheduler_pb2.GenerateResponse(
            request_id=request.request_id, chunk=scheduler_pb2.TokenChunk(offset=0, token_ids=list(range(n)))
        )
        yield scheduler_pb2.GenerateResponse(
            request_id=request.request_id,
            final=scheduler_pb2.GenerateFinal(
                finish_reason=types_pb2.FINISH_REASON_LENGTH, output_tokens=n, queue_s=0.0
            ),
        )

    def SetPolicy(self, request, context):  # type: ignore[no-untyped-def]
        from google.protobuf import json_format

        with self.lock:
            previous = self.policy
            self.policy = request.policy.name
            self.policies_set.append((request.policy.name, json_format.MessageToDict(request.policy.params)))
        return admin_pb2.SetPolicyResponse(
            previous=admin_pb2.PolicySpec(name=previous), current=request.policy
        )

    def ListWorkers(self, request, context):  # type: ignore[no-untyped-def]
        return admin_pb2.ListWorkersResponse(workers=[admin_pb2.WorkerInfo(worker_id="w0", healthy=True)])


@pytest.fixture
def fake_fleet() -> Iterator[tuple[str, FakeFleet]]:
    fleet = FakeFleet()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fleet, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(fleet, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", fleet
    server.stop(None)


def test_bench_runs_every_policy_on_the_same_workload(
    fake_fleet: tuple[str, FakeFleet], tmp_path: Path
) -> None:
    endpoint, fleet = fake_fleet
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--endpoint",
            endpoint,
            "--policies",
            "fcfs-full,layerkv",
            "--rate",
            "200",
            "--prompt-len",
            "8,24",
            "--output-len",
            "2:4",
            "--num-requests",
            "6",
            "--warmup",
            "0",
            "--params",
            'layerkv={"prefill_safety": 1.5}',
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    # Two prompt points x two policies, in that order, each policy set with its parameters.
    assert fleet.policies_set == [("fcfs-full", {}), ("layerkv", {"prefill_safety": 1.5})] * 2
    assert fleet.prompts["fcfs-full"] == fleet.prompts["layerkv"]  # the same workload for both
    assert sorted({len(p) for p in fleet.prompts["layerkv"]}) == [8, 24]
    data = json.loads(out.read_text())
    assert [p["prompt"] for p in data["points"]] == ["8", "24"]
    for point in data["points"]:
        assert [s["policy"] for s in point["summaries"]] == ["fcfs-full", "layerkv"]
        assert all(s["completed"] == 6 and s["failed"] == 0 for s in point["summaries"])
        assert point["comparisons"][0]["policy"] == "layerkv"
        assert len(point["results"]["layerkv"]) == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "against fcfs-full" in result.output


def test_bench_rejects_bad_options(fake_fleet: tuple[str, FakeFleet]) -> None:
    endpoint, _ = fake_fleet
    runner = CliRunner()
    for args in (["--rate", "0"], ["--prompt-len", "x"], ["--output-len", "5:2"], ["--params", "layerkv"]):
        result = runner.invoke(app, ["bench", "--endpoint", endpoint, "--warmup", "0", *args])
        assert result.exit_code != 0, args
