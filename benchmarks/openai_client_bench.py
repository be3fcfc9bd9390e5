"""A third-party client, ``vllm bench serve``, against our OpenAI API and against real vLLM.

One invocation starts ``layerkv up`` (one worker on ``--model-dir``, vLLM's KV cap converted to our
per-layer blocks), runs vLLM's own benchmark client against its ``/v1/completions``, stops it,
starts ``vllm serve`` on the same folder with the same cap, runs the same client command, and
prints both result JSONs side by side with ours/vLLM ratios (and writes them combined).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python benchmarks/openai_client_bench.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.openai_client_plan import (  # noqa: E402
    ClientRun,
    Endpoint,
    OurStack,
    bench_argv,
    combined_json,
    comparison_rows,
    our_up_argv,
    parse_result,
    progress_of,
    read_endpoint,
    summary_block,
)
from benchmarks.vs_vllm_report import format_rows  # noqa: E402
from benchmarks.vs_vllm_settings import VLLM_BLOCK_TOKENS, KvBudget, vllm_blocks_for  # noqa: E402

EPILOG = """\
Both servers get the same model folder, --num-gpu-blocks-override (vLLM) and the same token slots
per layer on our GPU tier (KvBudget in vs_vllm_settings.py), greedy decoding, EOS ignored, one
torch/OMP thread each. The client is vLLM's, unmodified; it reads OPENAI_API_KEY for the bearer
token, which is set to the key `layerkv up` prints (and unset for vLLM, which has none).

Example (a few minutes on a small CPU box; build the venv with benchmarks/vs_vllm.py --setup):
  python benchmarks/openai_client_bench.py --num-prompts 40 --request-rate 1 --input-len 256 --output-len 64
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=REPO / ".bench" / "vllm-venv", help="venv holding real vLLM")
    p.add_argument("--model-dir", type=Path, default=REPO / ".bench" / "model-small",
                   help="HF model folder (with tokenizer.json) both servers load")
    p.add_argument("--num-prompts", type=int, default=40, help="requests per server")
    p.add_argument("--request-rate", type=float, default=1.0, help="Poisson arrivals per second")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request (EOS ignored)")
    p.add_argument("--kv-requests", type=float, default=3.0,
                   help="how many whole requests the capped GPU-tier KV holds on each side")
    p.add_argument("--policy", default="layerkv", help="our scheduler policy")
    p.add_argument("--block-size", type=int, default=16, help="our tokens per block (must divide 32)")
    p.add_argument("--vllm-threads", type=int, default=1, help="OpenMP threads of vLLM's engine")
    p.add_argument("--skip-vllm", action="store_true", help="only our side (no ratios)")
    p.add_argument("--out", type=Path, default=REPO / ".bench" / "openai_client",
                   help="folder for ours.json, vllm.json, combined.json and the server logs")
    args = p.parse_args(argv)
    if VLLM_BLOCK_TOKENS % args.block_size:
        p.error(f"--block-size {args.block_size} must divide vLLM's block of {VLLM_BLOCK_TOKENS} tokens")
    if min(args.num_prompts, args.input_len, args.output_len) < 1 or args.request_rate <= 0:
        p.error("--num-prompts, --input-len, --output-len and --request-rate must be positive")
    return args


def log(msg: str) -> None:
    print(f"[client-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _num_layers(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def _drain(stream: object, sink: object, lines: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.append(line)
        sink.write(line)  # type: ignore[attr-defined]
        sink.flush()  # type: ignore[attr-defined]


@contextmanager
def our_stack(stack: OurStack, log_path: Path, timeout_s: float = 600.0,
              extra_env: dict[str, str] | None = None) -> Iterator[Endpoint]:
    """``layerkv up`` as a child process; yields the HTTP endpoint it prints, then stops it (SIGTERM)."""
    # none of the caller's LAYERKV_* settings or REDIS_URL: the command line alone decides the stack
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("LAYERKV_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra_env or {}))
    argv = our_up_argv(sys.executable, stack)
    log(f"starting ours: {' '.join(argv[1:])} (log {log_path})")
    lines: list[str] = []
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, env=env, cwd=REPO, process_group=0)
        reader = threading.Thread(target=_drain, args=(proc.stdout, sink, lines), daemon=True)
        reader.start()
        try:
            start = time.monotonic()
            while (endpoint := read_endpoint(list(lines))) is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"layerkv up exited with {proc.returncode}:\n{''.join(lines[-30:])}")
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"layerkv up printed no endpoint in {timeout_s:.0f} s")
                time.sleep(0.2)
            log(f"ours ready after {time.monotonic() - start:.0f} s at {endpoint.api_url}")
            yield endpoint
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # up stops its scheduler, worker and Redis itself
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            reader.join(5)


def run_client(run: ClientRun, api_key: str | None, log_path: Path) -> Path:
    """Run ``vllm bench serve`` (its own venv, none of our packages); the result JSON it saved."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("OPENAI_API_KEY", None)
    if api_key:
        env["OPENAI_API_KEY"] = api_key  # what vLLM's openai backend turns into the bearer header
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"})
    argv = bench_argv(run)
    log(f"client: {' '.join(argv)}")
    result = run.result_dir / run.result_filename
    result.unlink(missing_ok=True)
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
        start = next_note = time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                if time.monotonic() >= next_note + 15.0:  # the client's own bar goes to its log
                    next_note = time.monotonic()
                    done = progress_of(log_path.read_text(errors="replace"))
                    log(f"client running {next_note - start:.0f} s: {done or 'starting'} requests done")
        finally:
            if proc.poll() is None:  # interrupted: the client must not outlive us
                proc.terminate()
                proc.wait(30)
    print(summary_block(log_path.read_text(errors="replace")), flush=True)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}); log {log_path}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir.resolve()
    if not (model_dir / "tokenizer.json").is_file():
        raise SystemExit(f"{model_dir} has no tokenizer.json (build it with benchmarks/vs_vllm.py)")
    if not (args.venv / "bin" / "vllm").is_file():
        raise SystemExit(f"no vllm CLI in {args.venv}: run "
                         f"`python benchmarks/vs_vllm.py --setup --venv {args.venv}`")
    per_request = args.input_len + args.output_len
    budget = KvBudget(vllm_blocks_for(per_request, args.kv_requests), _num_layers(model_dir), args.block_size)
    # a margin over prompt+output: the client's random prompt can re-tokenize a few tokens longer
    max_len = min(budget.tokens, per_request + VLLM_BLOCK_TOKENS)
    per_layer = math.ceil(max_len / args.block_size)
    # host tier: every request at once in every layer, so that it is never the limit
    host = per_layer * budget.num_layers * args.num_prompts
    # staging: two layers of one longest request, as vs_vllm_settings.staging_blocks_for sizes it
    stack = OurStack(model_dir=model_dir, budget=budget, host_blocks=host, staging_blocks=2 * per_layer,
                     max_model_len=max_len, policy=args.policy)
    log(f"KV: {budget.describe()}; max_model_len {max_len}")

    def client_run(base_url: str, name: str) -> ClientRun:
        return ClientRun(venv=args.venv, base_url=base_url, model_dir=model_dir, num_prompts=args.num_prompts,
                         request_rate=args.request_rate, input_len=args.input_len, output_len=args.output_len,
                         result_dir=args.out.resolve(), result_filename=name)

    with our_stack(stack, args.out / "layerkv-up.log") as endpoint:
        ours_path = run_client(client_run(endpoint.base_url, "ours.json"), endpoint.api_key,
                               args.out / "client-ours.log")
    ours = parse_result(ours_path.read_text())
    log(f"ours: {ours.completed} completed, {ours.failed} failed in {ours.duration_s:.0f} s")
    if args.skip_vllm:
        log(f"--skip-vllm: no comparison; our result is {ours_path}")
        return 0

    from benchmarks.vs_vllm_real import VllmServerConfig, vllm_server

    cfg = VllmServerConfig(venv=args.venv, model_folder=model_dir, num_gpu_blocks=budget.vllm_override,
                           max_model_len=max_len, omp_threads=args.vllm_threads,
                           log_path=args.out / "vllm-serve.log")
    with vllm_server(cfg) as base:
        vllm_path = run_client(client_run(base, "vllm.json"), None, args.out / "client-vllm.log")
    vllm = parse_result(vllm_path.read_text())
    print("\n" + format_rows(comparison_rows(ours, vllm)), flush=True)
    info: dict[str, object] = {
        "command": " ".join(sys.argv), "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
        "kv": budget.describe(), "max_model_len": max_len, "policy": args.policy,
        "client": " ".join(bench_argv(client_run("<server>", "<name>.json"))[1:]),
    }
    combined = args.out / "combined.json"
    combined.write_text(json.dumps(combined_json(ours, vllm, info), indent=1))
    log(f"wrote {combined}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
