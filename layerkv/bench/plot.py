"""Plots of a benchmark: TTFT against prompt length, and the TTFT CDF, one series per policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from layerkv.bench.report import PointResult


def plot_points(points: Sequence[PointResult], path: Path) -> None:
    """Write a PNG with two panels; every workload point's requests are pooled per policy."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    pooled: dict[str, list[tuple[int, float]]] = {}
    for point in points:
        for policy, results in point.results.items():
            pooled.setdefault(policy, []).extend(
                (r.prompt_tokens, ttft) for r in results if r.ok and (ttft := r.ttft_s) is not None
            )
    fig, (by_len, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy, pairs in pooled.items():
        if not pairs:
            continue
        by_len.scatter([n for n, _ in pairs], [t for _, t in pairs], s=10, alpha=0.6, label=policy)
        ttfts = sorted(t for _, t in pairs)
        cdf.step(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], where="post", label=policy)
    by_len.set_xlabel("prompt tokens")
    by_len.set_ylabel("TTFT (s)")
    by_len.set_title("TTFT against prompt length")
    cdf.set_xlabel("TTFT (s)")
    cdf.set_ylabel("share of requests")
    cdf.set_title("TTFT CDF")
    for ax in (by_len, cdf):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
