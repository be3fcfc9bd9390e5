"""The benchmark's report math: per-request metrics, statistics, SLO attainment, ratios."""

from __future__ import annotations

import json
import math

import pytest

from layerkv.bench.report import (
    RequestResult,
    compare,
    percentile,
    point_result,
    stats,
    summarize,
    to_jsonable,
)


def result(
    index: int,
    sent: float,
    first: float | None,
    done: float | None,
    tokens: int,
    queue: float | None = 0.0,
    prompt: int = 100,
    error: str = "",
) -> RequestResult:
    return RequestResult(index, prompt, sent, first, done, tokens, queue, error)


def test_request_metrics() -> None:
    r = result(0, sent=1.0, first=1.5, done=3.5, tokens=5)
    assert r.ok
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(2.5)
    assert r.tpot_s == pytest.approx(0.5)  # 2.0 s over the 4 tokens after the first
    assert result(0, 0.0, 0.2, 0.2, 1).tpot_s is None  # one token: no TPOT
    failed = result(0, 0.0, None, None, 0, error="UNAVAILABLE: no worker")
    assert not failed.ok and failed.ttft_s is None and failed.e2e_s is None


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0], 50, 1.0),
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([float(v) for v in range(1, 101)], 99, 99.01),
        ([0.0, 10.0], 90, 9.0),
        ([5.0, 1.0], 100, 5.0),
        ([5.0, 1.0], 0, 1.0),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_stats_of_nothing_is_nan() -> None:
    s = stats([])
    assert s.count == 0 and math.isnan(s.mean) and math.isnan(s.p99)


def test_summary_attainment_counts_failures_as_misses() -> None:
    results = [
        result(0, 0.0, 0.5, 2.5, 5, queue=0.1),  # TTFT 0.5, TPOT 0.5
        result(1, 1.0, 3.0, 4.0, 3, queue=1.5),  # TTFT 2.0, TPOT 0.5
        result(2, 2.0, 2.25, 6.25, 5, queue=0.0),  # TTFT 0.25, TPOT 1.0
        result(3, 3.0, None, None, 0, queue=None, error="DEADLINE_EXCEEDED: too slow"),
    ]
    s = summarize("p", results, ttft_slo_s=1.0, tpot_slo_s=0.5)
    assert (s.requests, s.completed, s.failed) == (4, 3, 1)
    assert s.ttft.mean == pytest.approx((0.5 + 2.0 + 0.25) / 3)
    assert s.ttft.p50 == pytest.approx(0.5)
    assert s.queue.mean == pytest.approx((0.1 + 1.5 + 0.0) / 3)
    assert s.tpot.mean == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert s.e2e.p50 == pytest.approx(3.0)
    assert s.ttft_attainment == pytest.approx(2 / 4)  # requests 0 and 2
    assert s.tpot_attainment == pytest.approx(2 / 4)  # requests 0 and 1
    assert s.queue_share_of_ttft == pytest.approx(((0.1 + 1.5 + 0.0) / 3) / ((0.5 + 2.0 + 0.25) / 3))
    assert s.duration_s == pytest.approx(6.25)  # first send 0.0 to last finish 6.25
    assert s.throughput_tokens_s == pytest.approx(13 / 6.25)
    assert s.throughput_requests_s == pytest.approx(3 / 6.25)
    assert s.errors == ["DEADLINE_EXCEEDED: too slow"]


def test_comparison_ratios() -> None:
    base = summarize(
        "fcfs-full",
        [result(0, 0.0, 4.0, 6.0, 5, queue=3.0), result(1, 0.0, 8.0, 10.0, 5, queue=7.0)],
        ttft_slo_s=5.0,
        tpot_slo_s=0.5,
    )
    fast = summarize(
        "layerkv",
        [result(0, 0.0, 1.0, 3.4, 5, queue=0.5), result(1, 0.0, 2.0, 4.4, 5, queue=1.0)],
        ttft_slo_s=5.0,
        tpot_slo_s=0.5,
    )
    c = compare(base, fast)
    assert c.mean_ttft_speedup == pytest.approx(6.0 / 1.5)
    assert c.p99_ttft_speedup == pytest.approx(base.ttft.p99 / fast.ttft.p99)
    assert c.mean_queue_speedup == pytest.approx(5.0 / 0.75)
    assert c.mean_tpot_ratio == pytest.approx(0.6 / 0.5)
    assert c.ttft_attainment_delta_points == pytest.approx(50.0)  # 50 % → 100 %
    assert c.tpot_attainment_delta_points == pytest.approx(-100.0)  # 100 % → 0 %
    assert c.throughput_ratio == pytest.approx((10 / 4.4) / (10 / 10.0))


def test_point_result_compares_every_policy_with_the_first_and_serialises() -> None:
    rs = {
        "fcfs-full": [result(0, 0.0, 2.0, 3.0, 3)],
        "layerkv": [result(0, 0.0, 1.0, 2.0, 3)],
        "least-loaded": [result(0, 0.0, None, None, 0, error="x")],
    }
    point = point_result(2.0, "1024", rs, ttft_slo_s=1.5, tpot_slo_s=1.0)
    assert [c.policy for c in point.comparisons] == ["layerkv", "least-loaded"]
    assert point.comparisons[0].mean_ttft_speedup == pytest.approx(2.0)
    assert math.isnan(point.comparisons[1].mean_ttft_speedup)  # nothing completed
    data = json.loads(json.dumps(to_jsonable(point)))  # NaN must not leak into JSON
    assert data["comparisons"][1]["mean_ttft_speedup"] is None
    assert data["results"]["layerkv"][0]["ttft_s"] == pytest.approx(1.0)
    assert data["summaries"][0]["policy"] == "fcfs-full"
