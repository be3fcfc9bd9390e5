"""Terminal tables of a benchmark's results (rich)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from layerkv.bench.report import PointResult, Stats


def _s(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1.0 else f"{value:.2f} s"


def _stats(s: Stats) -> str:
    return f"{_s(s.mean)} / {_s(s.p50)} / {_s(s.p99)}"


def _x(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "-"


def render(points: Sequence[PointResult], console: Console) -> None:
    for point in points:
        table = Table(title=f"rate {point.rate:g} req/s, prompt {point.prompt}  (mean / P50 / P99)")
        for column in (
            "policy",
            "done",
            "queue",
            "TTFT",
            "TPOT",
            "end-to-end",
            "TTFT SLO",
            "TPOT SLO",
            "tokens/s",
        ):
            table.add_column(column, justify="left" if column == "policy" else "right")
        for s in point.summaries:
            table.add_row(
                s.policy,
                f"{s.completed}/{s.requests}",
                _stats(s.queue),
                _stats(s.ttft),
                _stats(s.tpot),
                _stats(s.e2e),
                f"{100 * s.ttft_attainment:.1f} %",
                f"{100 * s.tpot_attainment:.1f} %",
                f"{s.throughput_tokens_s:.1f}",
            )
        console.print(table)
        for s in point.summaries:
            if s.errors:
                console.print(f"[red]{s.policy}: {s.failed} failed, e.g. {s.errors[0]}[/red]")
        if point.comparisons:
            ratios = Table(title=f"against {point.comparisons[0].baseline}")
            for column in (
                "policy",
                "mean TTFT speedup",
                "P99 TTFT speedup",
                "mean queue speedup",
                "mean TPOT ratio",
                "TTFT SLO Δ",
                "TPOT SLO Δ",
                "throughput ratio",
            ):
                ratios.add_column(column, justify="left" if column == "policy" else "right")
            for c in point.comparisons:
                ratios.add_row(
                    c.policy,
                    _x(c.mean_ttft_speedup),
                    _x(c.p99_ttft_speedup),
                    _x(c.mean_queue_speedup),
                    _x(c.mean_tpot_ratio),
                    f"{c.ttft_attainment_delta_points:+.1f} pt",
                    f"{c.tpot_attainment_delta_points:+.1f} pt",
                    _x(c.throughput_ratio),
                )
            console.print(ratios)
