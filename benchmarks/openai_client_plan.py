"""The pure half of the third-party-client benchmark: command lines, result parsing, the table.

``ClientRun`` names one ``vllm bench serve`` run; ``bench_argv`` builds its command line and
``our_up_argv`` the ``layerkv up`` one (equal KV from ``KvBudget``); ``read_endpoint`` takes the
HTTP endpoint and key from up's banner; ``parse_result`` reads the client's result JSON into a typed
``ClientResult`` and ``comparison_rows`` lays two of them side by side with ours/vLLM ratios.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from benchmarks.vs_vllm_settings import KvBudget

SERVED_NAME = "bench"  # the model id both servers answer to (vs_vllm_real serves "bench" too)
LATENCIES = ("ttft", "tpot", "itl", "e2el")  # vLLM's names: first token, per output token, gaps, whole


@dataclass(frozen=True)
class ClientRun:
    """One ``vllm bench serve`` invocation against one server."""

    venv: Path
    base_url: str  # scheme://host:port, no /v1
    model_dir: Path  # the tokenizer the client samples and counts with
    num_prompts: int
    request_rate: float
    input_len: int
    output_len: int
    result_dir: Path
    result_filename: str
    seed: int = 0
    num_warmups: int = 2


def bench_argv(run: ClientRun) -> list[str]:
    """The client's command line (vLLM 0.32.0 flags); greedy, EOS ignored, every latency percentile."""
    return [
        str(run.venv / "bin" / "vllm"), "bench", "serve",
        "--backend", "openai", "--base-url", run.base_url, "--endpoint", "/v1/completions",
        "--model", SERVED_NAME, "--tokenizer", str(run.model_dir),
        "--dataset-name", "random", "--random-input-len", str(run.input_len),
        "--random-output-len", str(run.output_len),
        "--num-prompts", str(run.num_prompts), "--request-rate", str(run.request_rate),
        "--num-warmups", str(run.num_warmups), "--seed", str(run.seed),
        "--temperature", "0", "--ignore-eos",
        "--percentile-metrics", ",".join(LATENCIES), "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(run.result_dir), "--result-filename", run.result_filename,
    ]


@dataclass(frozen=True)
class OurStack:
    """How ``layerkv up`` is started for the comparison."""

    model_dir: Path
    budget: KvBudget
    host_blocks: int
    staging_blocks: int
    max_model_len: int
    policy: str


def our_up_argv(python: str, stack: OurStack) -> list[str]:
    """``layerkv up`` with one worker on the model folder and vLLM's KV converted to our blocks."""
    return [
        python, "-m", "layerkv", "up", "--model", str(stack.model_dir), "--workers", "1",
        "--port", "0", "--metrics-port", "0", "--http-port", "0", "--device", "cpu", "--dtype", "float32",
        "--block-size", str(stack.budget.our_block_size), "--gpu-blocks", str(stack.budget.our_gpu_blocks),
        "--host-blocks", str(stack.host_blocks), "--staging-blocks", str(stack.staging_blocks),
        "--max-model-len", str(stack.max_model_len), "--served-model-name", SERVED_NAME,
        "--policy", stack.policy,
    ]


@dataclass(frozen=True)
class Endpoint:
    """What ``layerkv up`` prints for HTTP clients."""

    api_url: str  # ends in /v1
    api_key: str

    @property
    def base_url(self) -> str:
        return self.api_url.removesuffix("/").removesuffix("/v1")


_API = re.compile(r"^\s*OpenAI API\s+(\S+)\s*$")
_KEY = re.compile(r"api_key=(\S+)")


def read_endpoint(lines: list[str]) -> Endpoint | None:
    """The endpoint once both the API line and the key line have been printed; None before."""
    url = next((m.group(1) for ln in lines if (m := _API.match(ln))), None)
    key = next((m.group(1) for ln in lines if (m := _KEY.search(ln))), None)
    return Endpoint(url, key) if url and key else None


@dataclass(frozen=True)
class ClientResult:
    """The figures of one client run (milliseconds for latencies, as the client writes them)."""

    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # requests/s
    output_throughput: float  # output tokens/s
    total_output_tokens: int
    latencies_ms: dict[str, float]  # e.g. "mean_ttft", "median_itl", "p99_e2el"


def parse_result(text: str) -> ClientResult:
    """Read ``vllm bench serve --save-result`` JSON; a missing figure is an error naming it."""
    doc = json.loads(text)
    needed = ("completed", "duration", "request_throughput", "output_throughput")
    missing = [k for k in needed if k not in doc]
    if missing:
        raise ValueError(f"the result JSON lacks {', '.join(missing)}")
    lat: dict[str, float] = {}
    for name in LATENCIES:
        for stat in ("mean", "median", "p99"):
            key = f"{stat}_{name}_ms"
            if key in doc and doc[key] is not None:
                lat[f"{stat}_{name}"] = float(doc[key])
    return ClientResult(completed=int(doc["completed"]), failed=int(doc.get("failed", 0) or 0),
                        duration_s=float(doc["duration"]),
                        request_throughput=float(doc["request_throughput"]),
                        output_throughput=float(doc["output_throughput"]),
                        total_output_tokens=int(doc.get("total_output_tokens", 0)), latencies_ms=lat)


def summary_block(log_text: str) -> str:
    """The client's own result block (between its ``=`` rules); the log's tail when it has none
    (then it failed, and the tail says why). Drops what follows, e.g. nanobind's leak report."""
    lines = log_text.splitlines()
    start = next((i for i, ln in enumerate(lines) if "Serving Benchmark Result" in ln), None)
    if start is None:
        return "\n".join(lines[-25:])
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("=====")), len(lines) - 1)
    return "\n".join(lines[start:end + 1])


_TQDM = re.compile(r"(\d+)/(\d+) \[")


def progress_of(log_text: str) -> str | None:
    """The client's latest tqdm count ("12/40") in its log so far; None before its bar starts."""
    found = _TQDM.findall(log_text[-4000:])
    return f"{found[-1][0]}/{found[-1][1]}" if found else None


_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}


def _figures(r: ClientResult) -> list[tuple[str, float]]:
    rows = [("completed / failed requests", float("nan")),
            ("request throughput (req/s)", r.request_throughput),
            ("output throughput (tok/s)", r.output_throughput)]
    for name in LATENCIES:
        rows += [(f"{stat} {_LABELS[name]} (ms)", r.latencies_ms.get(f"{stat}_{name}", float("nan")))
                 for stat in ("mean", "median", "p99")]
    return rows


def ratio(ours: float, theirs: float) -> float:
    """ours / vLLM; NaN when either is missing or vLLM's is 0."""
    if math.isnan(ours) or math.isnan(theirs) or theirs == 0:
        return float("nan")
    return ours / theirs


def _cell(x: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def comparison_rows(ours: ClientResult, vllm: ClientResult) -> list[list[str]]:
    """Header plus one row per figure: metric, ours, vLLM, ours/vLLM."""
    rows = [["metric", "ours", "vLLM", "ours/vLLM"]]
    for (label, a), (_, b) in zip(_figures(ours), _figures(vllm), strict=True):
        if label.startswith("completed"):
            rows.append([label, f"{ours.completed} / {ours.failed}", f"{vllm.completed} / {vllm.failed}", ""])
            continue
        rows.append([label, _cell(a), _cell(b), _cell(ratio(a, b))])
    return rows


def combined_json(ours: ClientResult, vllm: ClientResult, info: dict[str, object]) -> dict[str, object]:
    """Both runs and the ratios, JSON-safe (NaN becomes None)."""
    def clean(x: float) -> float | None:
        return None if math.isnan(x) else x

    pairs = zip(_figures(ours), _figures(vllm), strict=True)
    ratios = {label: clean(ratio(a, b)) for (label, a), (_, b) in pairs if not label.startswith("completed")}
    return {**info, "ours": ours.__dict__, "vllm": vllm.__dict__, "ratios_ours_over_vllm": ratios}
