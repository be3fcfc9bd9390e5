"""Terminal tables of a benchmark's results (rich): one row per metric, one column per policy, and
the sweep's SLO violation table (one row per rate and policy)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from layerkv.bench.report import Comparison, PointResult, PolicySummary, Stats
from layerkv.bench.slo import Slos
from layerkv.bench.sweep import SweepRow


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
    (
        "violating TTFT/TPOT/either",
        lambda s: "/".join(_pct(v) for v in (s.violations.ttft, s.violations.tpot, s.violations.either)),
    ),
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
    ("fewer violating either", lambda c: _pct(c.either_violation_reduction)),
    ("fewer violating TPOT", lambda c: _pct(c.tpot_violation_reduction)),
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


def render_slos(slos: Slos, console: Console) -> None:
    b = slos.batch1
    if b is not None:
        console.print(
            f"batch-1 on this fleet ({b.source}, {b.prompt_tokens}-token prompt): "
            f"TTFT {_s(b.ttft_s)}, decode step {_s(b.step_s)}"
        )
    ttft, tpot = f"{_s(slos.ttft_s)} ({slos.ttft.label()})", f"{_s(slos.tpot_s)} ({slos.tpot.label()})"
    console.print(f"SLOs: TTFT ≤ {ttft}, TPOT ≤ {tpot}")


def render_sweep(rows: Sequence[SweepRow], console: Console) -> None:
    """One row per rate and policy: the share of requests violating each SLO."""
    prompts = {r.prompt for r in rows}
    table = Table(title="SLO violations (share of requests; failures violate both)")
    table.add_column("rate", justify="right")
    if len(prompts) > 1:
        table.add_column("prompt")
    table.add_column("policy", no_wrap=True)
    for name in ("TTFT", "TPOT", "either", "both", "fewer either", "fewer TPOT"):
        table.add_column(name, justify="right")
    for r in sorted(rows, key=lambda r: (r.prompt, r.rate)):
        v = r.violations
        cells = [f"{r.rate:g}/s", *([r.prompt] if len(prompts) > 1 else []), r.policy]
        cells += [_pct(x) for x in (v.ttft, v.tpot, v.either, v.both)]
        cells += [_pct(r.either_violation_reduction), _pct(r.tpot_violation_reduction)]
        table.add_row(*cells)
    console.print(table)
