"""Real vLLM's side of the comparison: its OpenAI server in the vLLM venv, and a streaming client.

``vllm_server`` starts ``vllm serve`` (the venv's own CLI, a separate process tree) on the shared
model folder with the KV cache capped by ``num_gpu_blocks_override``, and stops it afterwards.
``run_openai_workload`` sends the benchmark's requests open loop, as ``layerkv.bench.runner`` does
for our scheduler, and times them at the client the same way (first streamed token, final chunk).
Preemptions come from the server's Prometheus counter, read before and after the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from layerkv.bench.report import RequestResult
from layerkv.bench.workload import BenchRequest
from layerkv.testing.ports import free_port


@dataclass(frozen=True)
class VllmServerConfig:
    """How ``vllm serve`` is started."""

    venv: Path
    model_folder: Path
    num_gpu_blocks: int  # num_gpu_blocks_override: the KV cache, in blocks of block_size tokens
    max_model_len: int
    log_path: Path
    block_size: int = 32
    gpu_memory_utilization: float = 0.3
    omp_threads: int = 1  # CPU threads of the engine core (the rest of the box is for the client etc.)
    kvcache_space_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE: what vLLM sizes its CPU cache from before the cap
    startup_timeout_s: float = 900.0
    host: str = "127.0.0.1"


def serve_argv(cfg: VllmServerConfig, port: int) -> list[str]:
    """The ``vllm serve`` command line (greedy decoding and ignore_eos come with each request)."""
    return [
        str(cfg.venv / "bin" / "vllm"), "serve", str(cfg.model_folder),
        "--host", cfg.host, "--port", str(port),
        "--served-model-name", "bench",
        "--dtype", "float32",
        "--block-size", str(cfg.block_size),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--num-gpu-blocks-override", str(cfg.num_gpu_blocks),
        "--max-model-len", str(cfg.max_model_len),
        # Random prompts share no prefix; off so that neither side can gain from a cache the other lacks.
        "--no-enable-prefix-caching",
        "--seed", "0",
    ]


def serve_env(cfg: VllmServerConfig) -> dict[str, str]:
    return vllm_cpu_env(cfg.omp_threads, cfg.kvcache_space_gib)


def vllm_cpu_env(omp_threads: int, kvcache_space_gib: int) -> dict[str, str]:
    """The environment any vLLM process of the venv runs in: CPU target, unpinned threads, offline."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the venv must not see our packages
    threads = str(omp_threads)
    env.update({
        "OMP_NUM_THREADS": threads,
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # no pinning: the 2 cores are shared with our side
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_space_gib),
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@contextlib.contextmanager
def vllm_server(cfg: VllmServerConfig) -> Iterator[str]:
    """A running ``vllm serve``; yields its base URL and stops its whole process group."""
    port = free_port(cfg.host)
    base = f"http://{cfg.host}:{port}"
    print(f"[vllm] starting vllm serve ({cfg.num_gpu_blocks} blocks of {cfg.block_size} tokens, "
          f"{cfg.omp_threads} OMP thread(s)); log {cfg.log_path}", flush=True)
    with open(cfg.log_path, "wb") as log:
        proc = subprocess.Popen(serve_argv(cfg, port), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=serve_env(cfg), process_group=0)
    try:
        _wait_healthy(proc, base, cfg)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, cfg: VllmServerConfig) -> None:
    start = last_note = time.monotonic()
    while time.monotonic() - start < cfg.startup_timeout_s:
        if time.monotonic() - last_note >= 30.0:  # startup (with torch.compile) takes minutes here
            last_note = time.monotonic()
            print(f"[vllm] still starting ({last_note - start:.0f} s)", flush=True)
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode}; log tail:\n"
                               f"{_log_tail(cfg.log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                sizes = [ln.split("] ", 1)[-1] for ln in _log_tail(cfg.log_path, 400).splitlines()
                         if "KV cache size" in ln or "num_gpu_blocks_override" in ln]
                print(f"[vllm] ready after {time.monotonic() - start:.0f} s; " + "; ".join(sizes), flush=True)
                return
        time.sleep(1.0)
    raise TimeoutError(f"vllm serve not healthy after {cfg.startup_timeout_s:.0f} s; log tail:\n"
                       f"{_log_tail(cfg.log_path)}")


_PREEMPT = re.compile(r"^vllm:num_preemptions(?:_total)?(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", re.MULTILINE)


def parse_preemptions(metrics_text: str) -> float | None:
    """The sum of vLLM's preemption counters in a Prometheus text page; None when absent."""
    values = [float(m.group(1)) for m in _PREEMPT.finditer(metrics_text)]
    return sum(values) if values else None


def read_preemptions(base: str) -> float | None:
    try:
        return parse_preemptions(httpx.get(f"{base}/metrics", timeout=10.0).text)
    except httpx.HTTPError:
        return None


def completion_body(req: BenchRequest) -> dict[str, object]:
    """The request vLLM gets for ``req``: token ids in, greedy, exactly max_tokens out."""
    return {
        "model": "bench",
        "prompt": list(req.prompt_token_ids),
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _one(client: httpx.AsyncClient, base: str, req: BenchRequest, start: float) -> RequestResult:
    while (delay := start + req.arrival_s - time.monotonic()) > 0:
        await asyncio.sleep(delay)
    sent = time.monotonic() - start
    first: float | None = None
    finished: float | None = None
    tokens = 0
    chunks = 0
    error = ""
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=completion_body(req)) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data.strip() == "[DONE]":
                        finished = time.monotonic() - start
                        break
                    msg = json.loads(data)
                    if msg.get("choices"):
                        chunks += 1
                        if first is None:
                            first = time.monotonic() - start
                    usage = msg.get("usage")
                    if usage:
                        tokens = int(usage.get("completion_tokens", 0))
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    if not error and finished is None:
        error = "stream ended without [DONE]"
    if not error and tokens == 0:
        tokens = chunks  # no usage chunk: one streamed chunk per token
    return RequestResult(index=req.index, prompt_tokens=len(req.prompt_token_ids), sent_s=sent,
                         first_token_s=first, finished_s=finished, output_tokens=tokens,
                         queue_s=None, error=error)


async def run_openai_workload(
    base: str,
    requests: Sequence[BenchRequest],
    on_done: Callable[[RequestResult], None] | None = None,
    timeout_s: float = 1800.0,
) -> list[RequestResult]:
    """Send every request at its arrival time to an OpenAI-compatible server; results in order."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        start = time.monotonic()

        async def tracked(req: BenchRequest) -> RequestResult:
            result = await _one(client, base, req, start)
            if on_done is not None:
                on_done(result)
            return result

        results = await asyncio.gather(*(tracked(r) for r in requests))
    return sorted(results, key=lambda r: r.index)
