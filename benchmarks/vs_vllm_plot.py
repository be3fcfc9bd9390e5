"""The plot of the vLLM comparison: per setting, the TTFT CDF and the mean TTFT / throughput bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.vs_vllm_report import SettingReport, SystemRun


def plot_settings(items: Sequence[tuple[SettingReport, Sequence[SystemRun]]], path: Path) -> None:
    """One row per setting: TTFT CDF (left), mean TTFT and throughput per system (right)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(items), 2, figsize=(12, 4 * len(items)), squeeze=False)
    for row, (report, runs) in enumerate(items):
        cdf, bars = axes[row]
        for run in runs:
            ttfts = sorted(t for r in run.results if r.ok and (t := r.ttft_s) is not None)
            if ttfts:
                shares = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
                cdf.step(ttfts, shares, where="post", label=run.label)
        cdf.set_xlabel("TTFT (s)")
        cdf.set_ylabel("share of requests")
        cdf.set_title(f"{report.setting}: TTFT CDF")
        cdf.grid(True, alpha=0.3)
        cdf.legend()
        labels = [s.policy for s in report.summaries]
        xs = range(len(labels))
        bars.bar([x - 0.2 for x in xs], [s.ttft.mean for s in report.summaries], width=0.4,
                 label="mean TTFT (s)")
        tput = bars.twinx()
        tput.bar([x + 0.2 for x in xs], [s.throughput_tokens_s for s in report.summaries], width=0.4,
                 color="tab:orange", label="output tok/s")
        bars.set_xticks(list(xs), labels, rotation=15)
        bars.set_ylabel("mean TTFT (s)")
        tput.set_ylabel("output tokens / s")
        bars.set_title(f"{report.setting}: mean TTFT (blue) and throughput (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
