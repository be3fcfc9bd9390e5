"""Host time per decode step: everything the engine does around the model's kernels.

The engine runs its real scheduler, KV manager, persistent block tables, per-layer metadata,
staging and copy submission; the model is replaced by a stand-in that walks every layer through
the step's ``LayerKVAccess`` (``begin_layer``/``end_layer``, so each host-placed layer's context is
streamed through staging and written back) but launches no kernel, and returns zero logits. So the
figure is what a GPU step costs the host (kernels are asynchronous there). On a CPU-only machine
the tier copies are synchronous memcpys (DMA on a GPU), timed apart as "KV copy"; with
``--kv-copies count`` the runs are submitted and counted but no KV moves, so the memcpy does not
evict the caches the step's bookkeeping runs in either. For each batch size and context, B
requests of C prompt tokens are prefilled, then ``--steps`` decode steps are timed; "runs" is the
copy runs a step submits (one ``copy_`` each on a GPU before batching), "calls" the copy calls
(one batched call per layer and direction now). Times are the median CPU time of the process
(torch runs one thread, and on a shared machine wall time would add the time spent waiting for a
core).

    python benchmarks/step_overhead.py                       # 32 layers, batches 1,32,256, 1k and 16k
    python benchmarks/step_overhead.py --batches 1,32 --contexts 1024 --steps 5
    python benchmarks/step_overhead.py --batches 256 --contexts 16384 --kv-copies count
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common.tokenizer import ByteTokenizer
from common.types import Placement, SamplingParams
from worker_svc.engine import Engine, EngineConfig
from worker_svc.kv.offload import CopyEngine, CopyHandle, DoneHandle
from worker_svc.kv.step_access import StepAccess
from worker_svc.model.config import ModelConfig
from worker_svc.model.loader import LoadedModel, _random_model

BATCHED_TOKENS = 1 << 16  # tokens per step while prefilling


def slack(batch: int, context: int) -> int:
    """Output tokens beyond the timed steps: the first requests decode while the last ones prefill."""
    return 8 + batch * context // BATCHED_TOKENS


class TimedCopyEngine(CopyEngine):
    """The CPU copy engine, timing its copies (data movement, DMA on a GPU) apart from the step.

    ``move=False`` counts the runs and moves no data (the stand-in model never reads the KV): on a
    CPU the ~1 GB of memcpy a b256 x 16k half-host step makes also evicts the caches the step's own
    bookkeeping runs in, a cost a GPU's DMA does not put on the host."""

    def __init__(self, move: bool = True) -> None:
        self.seconds = 0.0
        self.runs = 0
        self.calls = 0
        self.move = move

    def copy_runs(self, src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray) -> CopyHandle:
        self.runs += len(runs)
        self.calls += 1  # a GPU makes one batched copy call for all of them (CudaCopyEngine)
        if not self.move:
            return DoneHandle()
        start = time.process_time()
        handle = super().copy_runs(src, dst, runs)
        self.seconds += time.process_time() - start
        return handle


class NoKernelModel:
    """Stands in for the model: visits each layer's KV access, computes nothing."""

    def __init__(self, num_layers: int, vocab_size: int) -> None:
        self.num_layers, self.vocab_size = num_layers, vocab_size

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor,
                 kv: StepAccess, backend: object) -> torch.Tensor:
        for layer in range(self.num_layers):
            kv.begin_layer(layer)
            kv.end_layer(layer)
        return torch.zeros(logits_index.shape[0], self.vocab_size)  # [B, vocab]


def tiny_config(num_layers: int) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=2, intermediate_size=2,
                       num_layers=num_layers, num_heads=1, num_kv_heads=1, head_dim=2,
                       max_position_embeddings=1 << 20, eos_token_ids=(63,))


def build(num_layers: int, batch: int, context: int, steps: int, block_size: int, host_layers: int,
          move: bool = True) -> Engine:
    mc = tiny_config(num_layers)
    loaded = LoadedModel("tiny-hidden", mc, _random_model(mc, torch.device("cpu"), torch.float32, 0),
                         ByteTokenizer(256, 257))
    per_request = -(-(context + steps + slack(batch, context)) // block_size)  # blocks per layer
    gpu_layers, host = num_layers - host_layers, host_layers
    config = EngineConfig(block_size=block_size, gpu_blocks=batch * per_request * gpu_layers + 1,
                          host_blocks=batch * per_request * host + 1,
                          staging_blocks=2 * batch * per_request + 1 if host else 1,
                          max_num_seqs=max(batch, 1), max_num_batched_tokens=BATCHED_TOKENS,
                          max_prefill_tokens=BATCHED_TOKENS, max_promotions_per_step=0,
                          host_access="stream")  # a GPU step's host work: host layers go through staging
    engine = Engine(config, loaded, torch.device("cpu"), torch.float32, TimedCopyEngine(move))
    engine.model = NoKernelModel(num_layers, mc.vocab_size)  # type: ignore[assignment]
    return engine


def half_host(num_layers: int) -> str:
    return "GH" * (num_layers // 2) + "G" * (num_layers % 2)


@dataclass
class Cell:
    host_s: float  # median CPU time of a step less its KV copies
    copy_s: float  # median CPU time of the copy engine (memcpy of KV) in a step
    runs: float  # median copy runs a step submits (the copy calls of a GPU's run-by-run path)
    calls: float  # median copy calls a step submits (one per layer and direction; a GPU's batched path)


def measure(num_layers: int, batch: int, context: int, steps: int, block_size: int, letters: str,
            move: bool = True) -> Cell:
    """Host and copy CPU time of a decode step of ``batch`` requests at ``context`` tokens."""
    engine = build(num_layers, batch, context, steps, block_size, letters.count("H"), move)
    copies = engine.copy_engine
    assert isinstance(copies, TimedCopyEngine)
    placement = Placement.from_letters(letters, num_layers)
    for i in range(batch):
        engine.add_request(f"r{i}", [1 + (i + t) % 60 for t in range(context)],
                           SamplingParams(max_tokens=steps + slack(batch, context), ignore_eos=True),
                           placement)
    while any(r.output_ids == [] for r in engine._requests.values()):
        engine.step()  # prefill
    host, copy, runs, calls = [], [], [], []
    for _ in range(steps):
        copies.seconds, copies.runs, copies.calls = 0.0, 0, 0
        start = time.process_time()
        out = engine.step()
        took = time.process_time() - start
        assert out.stats.kind == "decode" and out.stats.num_decode_requests == batch, out.stats
        host.append(took - copies.seconds)
        copy.append(copies.seconds)
        runs.append(copies.runs)
        calls.append(copies.calls)
    return Cell(statistics.median(host), statistics.median(copy), statistics.median(runs),
                statistics.median(calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--contexts", default="1024,16384")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kv-copies", choices=("memcpy", "count"), default="memcpy",
                        help="count: submit the copy runs but move no KV (no memcpy evicting the caches)")
    args = parser.parse_args()
    move = args.kv_copies == "memcpy"
    torch.set_num_threads(1)
    placements = {"all-GPU": "G" * args.layers, "half-host": half_host(args.layers)}
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"{args.layers} layers, block size {args.block_size}, median of {args.steps} decode steps, "
          f"KV copies: {args.kv_copies}")
    print(f"{'batch':>6} {'context':>8} " + " ".join(
        f"{name + ' host':>16} {'KV copy':>10} {'runs':>6} {'calls':>6}" for name in placements))
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            cells = [measure(args.layers, batch, context, args.steps, args.block_size, letters, move)
                     for letters in placements.values()]
            row = " ".join(f"{c.host_s * 1e3:>13.2f} ms {c.copy_s * 1e3:>7.1f} ms {c.runs:>6.0f} "
                           f"{c.calls:>6.0f}" for c in cells)
            print(f"{batch:>6} {context:>8} {row}", flush=True)


if __name__ == "__main__":
    main()
