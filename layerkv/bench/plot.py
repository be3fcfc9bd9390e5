"""Plots of a benchmark: TTFT against prompt length and the TTFT CDF (``plot_points``), and the SLO
violation rates against request rate, one panel per kind (``plot_sweep``); one series per policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from layerkv.bench.report import VIOLATION_KINDS, PointResult
from layerkv.bench.sweep import SweepRow, series

_KIND_TITLES = {
    "ttft": "TTFT SLO violations",
    "tpot": "TPOT SLO violations",
    "either": "either SLO violated",
    "both": "both SLOs violated",
}


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


def plot_sweep(rows: Sequence[SweepRow], path: Path, title: str = "") -> None:
    """Write a PNG with one panel per violation kind: share of requests against request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(VIOLATION_KINDS), figsize=(4.2 * len(VIOLATION_KINDS), 4.0), sharey=True)
    for ax, kind in zip(axes, VIOLATION_KINDS, strict=True):
        for label, pairs in series(rows, kind).items():
            ax.plot([r for r, _ in pairs], [100.0 * v for _, v in pairs], marker="o", label=label)
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(_KIND_TITLES[kind])
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("requests violating (%)")
    axes[0].legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
