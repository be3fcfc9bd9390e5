"""Layer-wise placement on a GPU: prefill time with the paper's rule placement against all-resident
prefill, and the copy stream's KV throughput against the pinned-memory bandwidth, in one run.

Needs CUDA. Default model: the Llama-3-8B geometry with random weights in bfloat16.

    python benchmarks/layerwise_offload.py --prompts 4096,8192

For each prompt length: the all-resident prefill is timed first (median of --repeats); the rule
(``common.placement.rule_placement``) is fed a cost model with the bandwidth measured here and that
prefill time, and the prefill is timed again with its placement. "copy GB/s" is bytes offloaded over
the copy stream's busy time (CUDA events around every copy call).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common.placement import rule_placement
from common.types import CostModel, Placement, SamplingParams
from worker_svc.engine import Engine, EngineConfig
from worker_svc.kv.offload import CudaCopyEngine
from worker_svc.profiler import measure_bandwidth


def timed_prefill(engine: Engine, prompt: list[int], placement: Placement) -> tuple[float, float, int]:
    """(prefill step seconds, seconds until its copies are done, bytes offloaded)."""
    engine.add_request("bench", prompt, SamplingParams(max_tokens=1, ignore_eos=True), placement)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.step()
    step_s = time.perf_counter() - start  # sampling synchronised the compute stream
    torch.cuda.synchronize()
    copies_s = time.perf_counter() - start
    while engine.has_work():
        engine.step()
    return step_s, copies_s, out.stats.bytes_offloaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b-random")
    parser.add_argument("--prompts", default="4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs CUDA")
    device = torch.device("cuda")
    copies = CudaCopyEngine(device, timing=True)
    prompts = [int(x) for x in args.prompts.split(",")]
    # One request at a time, each prefilled in one step (a step budget of the longest prompt, so the
    # timed step is the whole prefill and not its first chunk); max_num_seqs and max_model_len
    # bound the memory plan's decode buffers to this run, leaving the rest to the GPU tier.
    longest = max(prompts) + 1
    engine = Engine.from_config(EngineConfig(model=args.model, device="cuda", dtype="bfloat16",
                                             block_size=args.block_size, max_prefill_tokens=longest,
                                             max_num_batched_tokens=longest, max_num_seqs=1,
                                             max_model_len=longest, host_kv_gib=8.0), copy_engine=copies)
    print(engine.memory_plan.describe())
    d2h, h2d = measure_bandwidth(device, nbytes=1 << 30)
    layers = engine.geometry.num_layers
    vocab = engine.model_config.vocab_size
    print(f"device={torch.cuda.get_device_name()} model={args.model} block={args.block_size} "
          f"pinned d2h={d2h / 1e9:.1f} GB/s h2d={h2d / 1e9:.1f} GB/s torch={torch.__version__} "
          f"attention={engine.backend.name}")
    print("| prompt | rule placement | resident | all-GPU prefill ms | rule prefill ms | ratio "
          "| until copies done ms | copy GB/s | copy / pinned |")
    print("|---|---|---|---|---|---|---|---|---|")
    timed_prefill(engine, [1] * 512, Placement.all_gpu(layers))  # warm-up
    for n in prompts:
        prompt = [(i * 31 + 1) % vocab for i in range(n)]
        full = statistics.median(timed_prefill(engine, prompt, Placement.all_gpu(layers))[0]
                                 for _ in range(args.repeats))
        cost = CostModel(d2h_bytes_per_s=d2h, h2d_bytes_per_s=h2d, prefill_per_token_s=full / n)
        placement = rule_placement(n, engine.geometry, cost)
        runs = []
        for _ in range(args.repeats):
            copies.timed_copies.clear()
            step_s, copies_s, nbytes = timed_prefill(engine, prompt, placement)
            busy = sum(s.elapsed_time(e) for s, e, _ in copies.timed_copies) / 1e3
            runs.append((step_s, copies_s, nbytes / busy if busy else 0.0))
        step_s = statistics.median(r[0] for r in runs)
        copies_s = statistics.median(r[1] for r in runs)
        gbps = statistics.median(r[2] for r in runs)
        print(f"| {n} | {placement.letters} | {placement.gpu_layers}/{layers} | {full * 1e3:.1f} "
              f"| {step_s * 1e3:.1f} | {step_s / full:.3f} | {copies_s * 1e3:.1f} | {gbps / 1e9:.1f} "
              f"| {gbps / d2h:.2f} |", flush=True)


if __name__ == "__main__":
    main()
