"""The rate sweep's SLO violation arithmetic, its rows, JSON and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from layerkv.bench.plot import plot_sweep
from layerkv.bench.report import RequestResult, Violations, point_result, reduction
from layerkv.bench.sweep import series, sweep_jsonable, sweep_rows

TTFT_SLO, TPOT_SLO = 1.0, 0.1


def req(
    index: int, ttft: float | None, tpot: float | None, tokens: int = 11, error: str = ""
) -> RequestResult:
    """A request sent at 0 with this TTFT and TPOT (None: no first token / no finish)."""
    done = None if ttft is None or tpot is None else ttft + tpot * (tokens - 1)
    return RequestResult(index, 100, 0.0, ttft, done, tokens, 0.0, error)


def test_violation_shares_count_each_kind_and_failures_miss_both() -> None:
    results = [
        req(0, 0.5, 0.05),  # meets both
        req(1, 2.0, 0.05),  # TTFT only
        req(2, 0.5, 0.20),  # TPOT only
        req(3, 2.0, 0.20),  # both
        req(4, 1.0, 0.10),  # exactly at both SLOs: meets them
        req(5, 0.5, 0.05, error="worker error: boom"),  # failed: misses both
        req(6, None, None, error="DEADLINE_EXCEEDED: late"),  # failed before any token
        req(7, 0.5, 9.0, tokens=1),  # one token: no TPOT, cannot miss it
    ]
    v = Violations.of(results, TTFT_SLO, TPOT_SLO)
    assert v.requests == 8
    assert v.ttft == pytest.approx(4 / 8)  # 1, 3, 5, 6
    assert v.tpot == pytest.approx(4 / 8)  # 2, 3, 5, 6
    assert v.either == pytest.approx(5 / 8)  # 1, 2, 3, 5, 6
    assert v.both == pytest.approx(3 / 8)  # 3, 5, 6
    empty = Violations.of([], TTFT_SLO, TPOT_SLO)
    assert empty.requests == 0 and math.isnan(empty.either)


def test_reduction_is_the_share_of_the_baselines_violations_avoided() -> None:
    assert reduction(0.5, 0.35) == pytest.approx(0.3)
    assert reduction(0.2, 0.3) == pytest.approx(-0.5)  # worse than the baseline
    assert math.isnan(reduction(0.0, 0.1))  # nothing to reduce


def _two_rates() -> list:
    low = {"vllm": [req(0, 0.5, 0.05), req(1, 0.5, 0.2)], "lk": [req(0, 0.5, 0.05), req(1, 0.5, 0.05)]}
    high = {
        "vllm": [req(0, 2.0, 0.2), req(1, 0.5, 0.2)],
        "lk": [req(0, 2.0, 0.05), req(1, 0.5, 0.05)],
    }
    return [
        point_result(1.0, "512", low, TTFT_SLO, TPOT_SLO),
        point_result(2.0, "512", high, TTFT_SLO, TPOT_SLO),
    ]


def test_sweep_rows_give_every_policy_at_every_rate_against_the_baseline() -> None:
    rows = sweep_rows(_two_rates())
    assert [(r.rate, r.policy) for r in rows] == [(1.0, "vllm"), (1.0, "lk"), (2.0, "vllm"), (2.0, "lk")]
    vllm_high, lk_high = rows[2], rows[3]
    assert (vllm_high.violations.either, vllm_high.violations.tpot, vllm_high.violations.both) == (
        1.0,
        1.0,
        0.5,
    )
    assert (lk_high.violations.either, lk_high.violations.tpot) == (0.5, 0.0)
    assert lk_high.either_violation_reduction == pytest.approx(0.5)
    assert lk_high.tpot_violation_reduction == pytest.approx(1.0)
    assert math.isnan(vllm_high.either_violation_reduction)  # the baseline has no ratio to itself
    assert series(rows, "tpot") == {"vllm": [(1.0, 0.5), (2.0, 1.0)], "lk": [(1.0, 0.0), (2.0, 0.0)]}
    # Several prompt distributions: each series says which.
    other = point_result(1.0, "128", {"vllm": [req(0, 0.5, 0.05)], "lk": [req(0, 0.5, 0.05)]}, 1.0, 0.1)
    assert set(series(sweep_rows([*_two_rates(), other]), "ttft")) == {
        "vllm (512)",
        "lk (512)",
        "vllm (128)",
        "lk (128)",
    }


def test_sweep_json_and_plot(tmp_path: Path) -> None:
    rows = sweep_rows(_two_rates())
    data = json.loads(json.dumps(sweep_jsonable(rows), allow_nan=False))  # NaN became null
    assert data[0]["policy"] == "vllm" and data[0]["either_violation_reduction"] is None
    assert data[3]["violations"] == {"ttft": 0.5, "tpot": 0.0, "either": 0.5, "both": 0.0, "requests": 2}
    assert data[3]["tpot_violation_reduction"] == 1.0
    png = tmp_path / "sweep.png"
    plot_sweep(rows, png, title="TTFT ≤ 1 s, TPOT ≤ 100 ms")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 3 * height  # four panels side by side
