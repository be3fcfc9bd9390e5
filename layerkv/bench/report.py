"""Benchmark results: per-request records, per-policy summaries, and the ratios between policies.

``RequestResult`` is what the runner measures for one request; ``summarize`` turns one policy's
results into means, percentiles, SLO attainment and throughput; ``compare`` gives each policy's
figures relative to the baseline (the first policy). Pure arithmetic, no I/O but ``to_json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RequestResult:
    """One request as the client saw it (times in seconds, relative to the start of the run)."""

    index: int
    prompt_tokens: int
    sent_s: float  # when the client sent it
    first_token_s: float | None  # when the first token arrived; None if none did
    finished_s: float | None  # when the final message arrived; None on failure
    output_tokens: int
    queue_s: float | None  # arrival to dispatch, as the scheduler measured it
    error: str = ""  # empty when the request completed
    server_ttft_s: float | None = None  # arrival to first token on the scheduler's clock (None: not sent)

    @property
    def ok(self) -> bool:
        return not self.error and self.finished_s is not None and self.first_token_s is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.first_token_s is None or self.finished_s is None or self.output_tokens < 2:
            return None
        return (self.finished_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles of one metric over the completed requests."""

    mean: float
    p50: float
    p99: float
    count: int


@dataclass(frozen=True)
class Violations:
    """Shares of all requests that missed an SLO; a failed request misses both."""

    ttft: float  # TTFT above its SLO
    tpot: float  # TPOT above its SLO (a request with one output token has no TPOT: never misses it)
    either: float  # missed at least one of the two
    both: float  # missed both
    requests: int  # the denominator

    @classmethod
    def of(cls, results: Sequence[RequestResult], ttft_slo_s: float, tpot_slo_s: float) -> Violations:
        if not results:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        misses = [
            (
                not r.ok or (ttft := r.ttft_s) is None or ttft > ttft_slo_s,
                not r.ok or ((tpot := r.tpot_s) is not None and tpot > tpot_slo_s),
            )
            for r in results
        ]
        n = len(results)
        return cls(
            ttft=sum(a for a, _ in misses) / n,
            tpot=sum(b for _, b in misses) / n,
            either=sum(a or b for a, b in misses) / n,
            both=sum(a and b for a, b in misses) / n,
            requests=n,
        )


VIOLATION_KINDS = ("ttft", "tpot", "either", "both")


@dataclass(frozen=True)
class PolicySummary:
    """One policy's run of the workload."""

    policy: str
    requests: int
    completed: int
    failed: int
    queue: Stats
    ttft: Stats
    tpot: Stats
    e2e: Stats
    ttft_slo_s: float
    tpot_slo_s: float
    ttft_attainment: float  # share of all requests with a TTFT within the SLO (failures count as misses)
    tpot_attainment: float  # share of all requests with a TPOT within the SLO
    violations: Violations  # SLO misses (TTFT, TPOT, either, both) over all requests
    queue_share_of_ttft: float  # mean queueing time / mean TTFT (the paper's motivation figure)
    duration_s: float  # first send to last finish
    throughput_tokens_s: float  # output tokens per second over the run
    throughput_requests_s: float
    errors: list[str] = field(default_factory=list)  # distinct error messages (first few)


@dataclass(frozen=True)
class Comparison:
    """A policy against the baseline: ratios > 1 mean "baseline / policy" for times (lower is better)."""

    policy: str
    baseline: str
    mean_ttft_speedup: float  # baseline mean TTFT / policy mean TTFT
    p99_ttft_speedup: float
    mean_queue_speedup: float
    mean_tpot_ratio: float  # policy mean TPOT / baseline mean TPOT
    ttft_attainment_delta_points: float  # policy − baseline, percentage points
    tpot_attainment_delta_points: float
    throughput_ratio: float  # policy / baseline output tokens per second
    # 1 − policy / baseline share of requests missing an SLO: 0.3 is "30 % fewer" (the paper's
    # 28.7 % is this figure for `either`); NaN when the baseline misses none.
    either_violation_reduction: float = math.nan
    tpot_violation_reduction: float = math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (as numpy's default), ``q`` in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats(values: Sequence[float]) -> Stats:
    if not values:
        return Stats(math.nan, math.nan, math.nan, 0)
    return Stats(sum(values) / len(values), percentile(values, 50), percentile(values, 99), len(values))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else math.nan


def summarize(
    policy: str, results: Sequence[RequestResult], ttft_slo_s: float, tpot_slo_s: float
) -> PolicySummary:
    done = [r for r in results if r.ok]
    ttft = [v for r in done if (v := r.ttft_s) is not None]
    tpot = [v for r in done if (v := r.tpot_s) is not None]
    e2e = [v for r in done if (v := r.e2e_s) is not None]
    queue = [r.queue_s for r in done if r.queue_s is not None]
    total = len(results)
    # A request with a single output token has no TPOT: it cannot miss the TPOT SLO.
    tpot_ok = sum(1 for r in done if (v := r.tpot_s) is None or v <= tpot_slo_s)
    ttft_ok = sum(1 for v in ttft if v <= ttft_slo_s)
    if done:
        start = min(r.sent_s for r in results)
        end = max(r.finished_s for r in done if r.finished_s is not None)
        duration = max(end - start, 1e-9)
    else:
        duration = math.nan
    out_tokens = sum(r.output_tokens for r in done)
    return PolicySummary(
        policy=policy,
        requests=total,
        completed=len(done),
        failed=total - len(done),
        queue=stats(queue),
        ttft=stats(ttft),
        tpot=stats(tpot),
        e2e=stats(e2e),
        ttft_slo_s=ttft_slo_s,
        tpot_slo_s=tpot_slo_s,
        ttft_attainment=ttft_ok / total if total else math.nan,
        tpot_attainment=tpot_ok / total if total else math.nan,
        violations=Violations.of(results, ttft_slo_s, tpot_slo_s),
        queue_share_of_ttft=_ratio(stats(queue).mean, stats(ttft).mean),
        duration_s=duration,
        throughput_tokens_s=out_tokens / duration if done else 0.0,
        throughput_requests_s=len(done) / duration if done else 0.0,
        errors=sorted({r.error for r in results if r.error})[:5],
    )


def compare(baseline: PolicySummary, other: PolicySummary) -> Comparison:
    return Comparison(
        policy=other.policy,
        baseline=baseline.policy,
        mean_ttft_speedup=_ratio(baseline.ttft.mean, other.ttft.mean),
        p99_ttft_speedup=_ratio(baseline.ttft.p99, other.ttft.p99),
        mean_queue_speedup=_ratio(baseline.queue.mean, other.queue.mean),
        mean_tpot_ratio=_ratio(other.tpot.mean, baseline.tpot.mean),
        ttft_attainment_delta_points=100.0 * (other.ttft_attainment - baseline.ttft_attainment),
        tpot_attainment_delta_points=100.0 * (other.tpot_attainment - baseline.tpot_attainment),
        throughput_ratio=_ratio(other.throughput_tokens_s, baseline.throughput_tokens_s),
        either_violation_reduction=reduction(baseline.violations.either, other.violations.either),
        tpot_violation_reduction=reduction(baseline.violations.tpot, other.violations.tpot),
    )


def reduction(baseline: float, other: float) -> float:
    """``1 − other / baseline``: the share of the baseline's violations the other avoids."""
    return 1.0 - other / baseline if baseline > 0 and math.isfinite(other) else math.nan


@dataclass(frozen=True)
class PointResult:
    """All policies on one workload point (a rate and a prompt-length distribution)."""

    rate: float
    prompt: str
    summaries: list[PolicySummary]
    comparisons: list[Comparison]
    results: dict[str, list[RequestResult]]  # per policy, every request


def point_result(
    rate: float, prompt: str, results: dict[str, list[RequestResult]], ttft_slo_s: float, tpot_slo_s: float
) -> PointResult:
    summaries = [summarize(name, rs, ttft_slo_s, tpot_slo_s) for name, rs in results.items()]
    comparisons = [compare(summaries[0], s) for s in summaries[1:]]
    return PointResult(rate, prompt, summaries, comparisons, results)


def to_jsonable(point: PointResult) -> dict[str, object]:
    """A JSON-ready dict (NaN becomes None)."""

    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    raw = asdict(point)
    for name, rs in point.results.items():  # add the derived per-request metrics
        raw["results"][name] = [
            {**asdict(r), "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2e_s": r.e2e_s} for r in rs
        ]
    cleaned = clean(raw)
    assert isinstance(cleaned, dict)
    return cleaned
