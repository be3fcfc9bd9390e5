"""The request-rate sweep: SLO violation rates of every policy at every rate, as rows.

One ``SweepRow`` per workload point and policy; the terminal table, the ``sweep`` list of the JSON
and the violation-vs-rate plot are all drawn from these rows. Pure arithmetic over the summaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from layerkv.bench.report import PointResult, Violations


@dataclass(frozen=True)
class SweepRow:
    """One policy at one workload point."""

    rate: float
    prompt: str
    policy: str  # the variant's label
    violations: Violations
    either_violation_reduction: float  # against the baseline (the first policy); NaN for it
    tpot_violation_reduction: float


def sweep_rows(points: Sequence[PointResult]) -> list[SweepRow]:
    rows: list[SweepRow] = []
    for point in points:
        by_policy = {c.policy: c for c in point.comparisons}
        for s in point.summaries:
            c = by_policy.get(s.policy)
            rows.append(
                SweepRow(
                    rate=point.rate,
                    prompt=point.prompt,
                    policy=s.policy,
                    violations=s.violations,
                    either_violation_reduction=c.either_violation_reduction if c else math.nan,
                    tpot_violation_reduction=c.tpot_violation_reduction if c else math.nan,
                )
            )
    return rows


def sweep_jsonable(rows: Sequence[SweepRow]) -> list[dict[str, object]]:
    """JSON-ready rows (NaN becomes None)."""

    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return [{k: clean(v) for k, v in asdict(r).items()} for r in rows]


def series(rows: Sequence[SweepRow], kind: str) -> dict[str, list[tuple[float, float]]]:
    """``{series label: [(rate, violation share), ...]}`` for one kind (ttft, tpot, either, both);
    a sweep over several prompt distributions names each series ``policy (prompt)``."""
    prompts = {r.prompt for r in rows}
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        label = r.policy if len(prompts) == 1 else f"{r.policy} ({r.prompt})"
        out.setdefault(label, []).append((r.rate, getattr(r.violations, kind)))
    return {label: sorted(pairs) for label, pairs in out.items()}
