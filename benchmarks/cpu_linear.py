"""CPU matmul speed of a linear layer: torch's default (MKL sgemm) against oneDNN with a prepacked
weight (``worker_svc.model.linear``), one thread, for the projection shapes of the bench models.
The weight stays in cache across repeats here, which favours MKL at one row; in a model's decode
step the weights stream from memory (see the module docstring of ``worker_svc.model.linear``).

    python benchmarks/cpu_linear.py [--rows 1,2,32,512,2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from worker_svc.model.linear import _packed_weight, linear, uses_onednn

# (in, out) of the projections: the vs_vllm "small" model (hidden 256) and "large" (hidden 576)
SHAPES = [(256, 512), (256, 768), (768, 256), (576, 1728), (1728, 576)]


def timed_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def one_shape(k: int, n: int, m: int, repeats: int) -> str:
    """One table row: an [m, k] x [k, n] matmul both ways."""
    w, x = torch.randn(n, k), torch.randn(m, k)
    with torch.inference_mode():
        # (sums of k float32 products: the absolute error grows with sqrt(k))
        assert torch.allclose(linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-5 * k ** 0.5)
        mkl = timed_ms(lambda: F.linear(x, w), repeats)
        packed_w = _packed_weight(w)
        onednn = timed_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, packed_w, None, "none", [], ""),
                          repeats)
    with torch.inference_mode():
        note = "" if uses_onednn(x, w) else "  (linear() keeps F.linear here)"
    gf = 2 * m * k * n / 1e6
    return (f"{k:>5}x{n:<5} {m:>5} {mkl:>8.3f} {onednn:>9.3f} {mkl / onednn:>5.2f}x {gf / mkl:>9.0f} "
            f"{gf / onednn:>11.0f}{note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,32,512,2048", help="batch rows (tokens) per matmul")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} "
          f"thread(s), float32; time per matmul, MKL (F.linear) / packed oneDNN, and GFLOP/s")
    print(f"{'in x out':>11} {'rows':>5} {'MKL ms':>8} {'oneDNN ms':>9} {'ratio':>6} {'MKL GF/s':>9} "
          f"{'oneDNN GF/s':>11}")
    for k, n in SHAPES:
        for m in (int(r) for r in args.rows.split(",")):
            print(one_shape(k, n, m, args.repeats))

if __name__ == "__main__":
    main()
