"""Terminal tables of a benchmark's results (rich): one row per metric, one column per policy."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from layerkv.bench.report import Comparison, PointResult, PolicySummary, Stats


def _s(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1.0 else f"{value:.2f} s"


def _stats(s: Stats) -> str:
    return f"{_s(s.mean)} / {_s(s.p50)} / {_s(s.p99)}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %" if math.isfinite(value) else "-"


def _x(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "-"


_ROWS: list[tuple[str, Callable[[PolicySummary], str]]] = [
    ("completed", lambda s: f"{s.completed}/{s.requests}"),
    ("queue  mean/P50/P99", lambda s: _stats(s.queue)),
    ("TTFT   mean/P50/P99", lambda s: _stats(s.ttft)),
    ("TPOT   mean/P50/P99", lambda s: _stats(s.tpot)),
    ("e2e    mean/P50/P99", lambda s: _stats(s.e2e)),
    ("queue share of TTFT", lambda s: _pct(s.queue_share_of_ttft)),
    ("TTFT SLO attainment", lambda s: f"{_pct(s.ttft_attainment)} (≤ {_s(s.ttft_slo_s)})"),
    ("TPOT SLO attainment", lambda s: f"{_pct(s.tpot_attainment)} (≤ {_s(s.tpot_slo_s)})"),
    ("throughput", lambda s: f"{s.throughput_tokens_s:.1f} tok/s, {s.throughput_requests_s:.2f} req/s"),
]

_RATIO_ROWS: list[tuple[str, Callable[[Comparison], str]]] = [
    ("mean TTFT speedup", lambda c: _x(c.mean_ttft_speedup)),
    ("P99 TTFT speedup", lambda c: _x(c.p99_ttft_speedup)),
    ("mean queue speedup", lambda c: _x(c.mean_queue_speedup)),
    ("mean TPOT ratio", lambda c: _x(c.mean_tpot_ratio)),
    ("TTFT SLO Δ", lambda c: f"{c.ttft_attainment_delta_points:+.1f} pt"),
    ("TPOT SLO Δ", lambda c: f"{c.tpot_attainment_delta_points:+.1f} pt"),
    ("throughput ratio", lambda c: _x(c.throughput_ratio)),
]


def render(points: Sequence[PointResult], console: Console) -> None:
    for point in points:
        table = Table(title=f"rate {point.rate:g} req/s, prompt {point.prompt}")
        table.add_column("metric")
        for s in point.summaries:
            table.add_column(s.policy, justify="right")
        for label, cell in _ROWS:
            table.add_row(label, *(cell(s) for s in point.summaries))
        console.print(table)
        for s in point.summaries:
            if s.errors:
                console.print(f"[red]{s.policy}: {s.failed} failed, e.g. {s.errors[0]}[/red]")
        if point.comparisons:
            ratios = Table(title=f"against {point.comparisons[0].baseline}")
            ratios.add_column("ratio")
            for c in point.comparisons:
                ratios.add_column(c.policy, justify="right")
            for label, ratio in _RATIO_ROWS:
                ratios.add_row(label, *(ratio(c) for c in point.comparisons))
            console.print(ratios)
