"""``layerkv bench --endpoint`` end to end against a fake scheduler (sync gRPC server in threads):
policy variants, the rate sweep, SLOs derived from the cost model or a probe, JSON and plots."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from common.types import CostModel
from common.wire import cost_model_to_proto
from layerkv.cli import app


class FakeFleet(scheduler_pb2_grpc.SchedulerServiceServicer, admin_pb2_grpc.AdminServiceServicer):
    """Answers every request with its max_tokens tokens.

    Policies named in ``first_token_delay_s`` wait that long before the first token; with
    ``token_interval_s`` the tokens come one per message that far apart (else all in one).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.policy = "fcfs-full"
        self.policies_set: list[tuple[str, dict[str, object]]] = []
        self.prompts: dict[str, list[tuple[int, ...]]] = {}
        self.slos: list[tuple[float, float]] = []
        self.first_token_delay_s: dict[str, float] = {}
        self.token_interval_s = 0.0
        self.cost_model = CostModel()

    def Generate(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            policy = self.policy
            self.prompts.setdefault(policy, []).append(tuple(request.token_ids.ids))
            self.slos.append((request.slo.ttft_s, request.slo.tpot_s))
        n = request.sampling.max_tokens
        time.sleep(self.first_token_delay_s.get(policy, 0.0))
        if self.token_interval_s:
            for i in range(n):
                if i:
                    time.sleep(self.token_interval_s)
                yield scheduler_pb2.GenerateResponse(
                    request_id=request.request_id, chunk=scheduler_pb2.TokenChunk(offset=i, token_ids=[i])
                )
        else:
            yield scheduler_pb2.GenerateResponse(
                request_id=request.request_id,
                chunk=scheduler_pb2.TokenChunk(offset=0, token_ids=list(range(n))),
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
        info = admin_pb2.WorkerInfo(
            worker_id="w0", healthy=True, cost_model=cost_model_to_proto(self.cost_model)
        )
        return admin_pb2.ListWorkersResponse(workers=[info])


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
    # Two prompt points x two policies, in that order, each policy set (fresh) with its parameters.
    assert fleet.policies_set == [("fcfs-full", {}), ("layerkv", {"prefill_safety": 1.5})] * 2
    # The same workload for both (sorted: requests 5 ms apart may reach the server out of order).
    assert sorted(fleet.prompts["fcfs-full"]) == sorted(fleet.prompts["layerkv"])
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
    endpoint, fleet = fake_fleet
    runner = CliRunner()
    for args, message in (
        (["--rate", "0"], "positive"),
        (["--prompt-len", "x"], "prompt length"),
        (["--output-len", "5:2"], "MIN <= MAX"),
        (["--params", "layerkv"], "NAME=JSON"),
        (["--policies", "vllm,layerkv:no_such_knob=1"], "no_such_knob"),
        (["--policies", "vllm,nosuch"], "unknown policy 'nosuch'"),
        (["--policies", "vllm,vllm"], "labelled 'vllm'"),
        (["--policies", "layerkv:prefill_safety"], "KEY=VALUE"),
        (["--tpot-slo", "fast"], "--tpot-slo"),
        (["--ttft-slo", "-2x"], "--ttft-slo"),
        (["--slo-basis", "magic"], "--slo-basis"),
    ):
        result = runner.invoke(app, ["bench", "--endpoint", endpoint, "--warmup", "0", *args])
        assert result.exit_code != 0, args
        assert message in " ".join(result.output.split()), (args, result.output)
    assert fleet.prompts == {}  # refused before anything was sent


def test_bench_help_explains_variants_sweeps_and_derived_slos() -> None:
    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for needle in (
        "--rates",
        "--tpot-slo",
        "1.5x",
        "--slo-basis",
        "--sweep-plot",
        "NAME:KEY=VALUE:...@LABEL",
    ):
        assert needle in text, needle


def test_rate_sweep_of_variants_with_the_tpot_slo_from_the_cost_model(
    fake_fleet: tuple[str, FakeFleet], tmp_path: Path
) -> None:
    endpoint, fleet = fake_fleet
    fleet.cost_model = CostModel(decode_base_s=0.004, decode_per_context_token_s=1e-5)
    fleet.first_token_delay_s = {"layerkv": 0.3}  # every layerkv variant misses a 0.2 s TTFT SLO
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    result = CliRunner().invoke(
        app,
        [
            "bench", "--endpoint", endpoint,
            "--policies", "layerkv,layerkv:prefill_safety=2@lk2,vllm",
            "--rates", "100,200", "--prompt-len", "20", "--output-len", "3",
            "--num-requests", "4", "--warmup", "0",
            "--ttft-slo", "0.2", "--tpot-slo", "1.5x", "--slo-basis", "cost-model",
            "--json", str(out), "--sweep-plot", str(png),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    step = 0.004 + 20 * 1e-5  # the batch-1 step of a 20-token prompt
    data = json.loads(out.read_text())
    assert data["slos"]["batch1"]["source"] == "cost-model"
    assert data["slos"]["tpot_s"] == pytest.approx(1.5 * step) and data["slos"]["ttft_s"] == 0.2
    assert len(fleet.slos) == 3 * 2 * 4  # no probe: the cost model gave the step
    assert all(slo == (pytest.approx(0.2), pytest.approx(1.5 * step)) for slo in fleet.slos)  # every request
    # The baseline is set before the SLOs are resolved, then the variants take turns on each rate,
    # each with its own parameters; the label names the variant in the results.
    runs = [("layerkv", {}), ("layerkv", {"prefill_safety": 2.0}), ("vllm", {})]
    assert fleet.policies_set == [("layerkv", {})] + runs * 2
    rows = data["sweep"]
    assert [(r["rate"], r["policy"]) for r in rows] == [
        (rate, p) for rate in (100.0, 200.0) for p in ("layerkv", "lk2", "vllm")
    ]
    for r in rows:
        slow = r["policy"] != "vllm"
        assert r["violations"]["ttft"] == (1.0 if slow else 0.0)
        assert r["violations"]["either"] == r["violations"]["ttft"] and r["violations"]["tpot"] == 0.0
        assert r["either_violation_reduction"] == {"layerkv": None, "lk2": 0.0, "vllm": 1.0}[r["policy"]]
    assert [s["policy"] for s in data["points"][0]["summaries"]] == ["layerkv", "lk2", "vllm"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SLO violations" in result.output and "100.0 %" in result.output


def test_tpot_slo_from_a_probe_when_the_workers_advertise_no_profile(
    fake_fleet: tuple[str, FakeFleet], tmp_path: Path
) -> None:
    endpoint, fleet = fake_fleet
    fleet.token_interval_s = 0.005  # a lone request decodes at >= 5 ms per token
    out = tmp_path / "probe.json"
    result = CliRunner().invoke(
        app,
        [
            "bench", "--endpoint", endpoint, "--policies", "vllm",
            "--rate", "100", "--prompt-len", "24", "--output-len", "2",
            "--num-requests", "2", "--warmup", "0",
            "--ttft-slo", "4x", "--tpot-slo", "1.5x", "--json", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    slos = json.loads(out.read_text())["slos"]
    assert slos["batch1"]["source"] == "probe" and slos["batch1"]["prompt_tokens"] == 24
    assert slos["tpot_s"] == pytest.approx(1.5 * slos["batch1"]["step_s"])
    assert slos["ttft_s"] == pytest.approx(4 * slos["batch1"]["ttft_s"])
    assert slos["batch1"]["step_s"] >= 0.005  # measured through the fleet, not the default model
    probes = fleet.prompts["vllm"][:6]  # a warm-up and five distinct 24-token probes before the run
    assert len(set(probes)) == 6 and {len(p) for p in probes} == {24}
    assert len(fleet.prompts["vllm"]) == 6 + 2
    assert "batch-1 on this fleet (probe" in result.output


def test_an_embedded_start_that_loses_a_port_race_is_retried(
    fake_fleet: tuple[str, FakeFleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    import layerkv.embedded
    from common.errors import Unavailable

    endpoint, fleet = fake_fleet
    attempts: list[str] = []

    def flaky_start(opts: layerkv.embedded.EmbeddedOptions, system: layerkv.embedded.EmbeddedSystem) -> None:
        attempts.append(opts.policy)
        if len(attempts) == 1:  # what a child that could not bind its port looks like
            raise Unavailable("scheduler exited with code 1; its log (...):\nOSError: [Errno 98] in use")
        system.scheduler_address = endpoint  # the fake fleet stands in for the started system

    monkeypatch.setattr(layerkv.embedded, "start", flaky_start)
    args = ["bench", "--policies", "vllm", "--rate", "100", "--prompt-len", "8", "--output-len", "2"]
    result = CliRunner().invoke(app, [*args, "--num-requests", "2", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert attempts == ["vllm", "vllm"] and "retrying with new ports" in " ".join(result.output.split())
    assert len(fleet.prompts["vllm"]) == 2

    attempts.clear()
    monkeypatch.setattr(layerkv.embedded, "start", lambda opts, system: flaky_start(opts, system) or _fail())
    result = CliRunner().invoke(app, [*args, "--num-requests", "2", "--warmup", "0"])
    assert result.exit_code == 1 and len(attempts) == 3  # gives up after three starts
    assert "error: always busy" in result.output


def _fail() -> None:
    from common.errors import Unavailable

    raise Unavailable("always busy")
