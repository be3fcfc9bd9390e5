"""Results of the vLLM comparison: per-system summaries, ratios against real vLLM, the issue's
targets, the printed table and the JSON document.

Summaries reuse ``layerkv.bench.report.summarize`` (the same TTFT, TPOT = (e2e - TTFT)/(n - 1),
SLO attainment and throughput arithmetic as ``layerkv bench``) on both sides; the baseline of every
ratio is real vLLM. Pure arithmetic and formatting, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from layerkv.bench.report import PolicySummary, RequestResult, summarize

REAL_VLLM = "real-vllm"


def our_label(policy: str) -> str:
    return f"ours-{policy}"


@dataclass(frozen=True)
class SystemRun:
    """One system's run of a setting's workload."""

    label: str  # REAL_VLLM or ours-<policy>
    results: list[RequestResult]
    preemptions: float | None  # None: not reported ("n/a")


@dataclass(frozen=True)
class Ratios:
    """One of our systems against real vLLM (for times: ours / vLLM, lower is better)."""

    label: str
    mean_ttft_ratio: float  # ours mean TTFT / vLLM mean TTFT
    mean_ttft_speedup: float  # vLLM mean TTFT / ours (the "x lower" figure)
    p99_ttft_ratio: float
    mean_tpot_ratio: float
    tpot_attainment_delta_points: float  # ours - vLLM, percentage points
    throughput_ratio: float  # ours / vLLM output tokens per second
    mean_e2e_ratio: float  # ours / vLLM mean per-request time (send to last token)


@dataclass(frozen=True)
class SettingReport:
    setting: str
    summaries: list[PolicySummary]
    preemptions: dict[str, float | None]
    ratios: list[Ratios]
    targets: list[str]  # the acceptance checks that apply here, each "PASS ..." / "FAIL ..."
    # request 0 arrives at an empty system: its TTFT and TPOT are the engine's unloaded speed, which
    # separates engine speed from scheduling in the figures above
    unloaded: dict[str, tuple[float | None, float | None]]


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else math.nan


def ratios(base: PolicySummary, other: PolicySummary) -> Ratios:
    return Ratios(
        label=other.policy,
        mean_ttft_ratio=_ratio(other.ttft.mean, base.ttft.mean),
        mean_ttft_speedup=_ratio(base.ttft.mean, other.ttft.mean),
        p99_ttft_ratio=_ratio(other.ttft.p99, base.ttft.p99),
        mean_tpot_ratio=_ratio(other.tpot.mean, base.tpot.mean),
        tpot_attainment_delta_points=100.0 * (other.tpot_attainment - base.tpot_attainment),
        throughput_ratio=_ratio(other.throughput_tokens_s, base.throughput_tokens_s),
        mean_e2e_ratio=_ratio(other.e2e.mean, base.e2e.mean),
    )


def _check(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {text}"


def targets_for(setting: str, by_label: dict[str, Ratios]) -> list[str]:
    """The issues' targets: ours-vllm within 15 % of vLLM at kv1/kv3 and its per-request time
    within 10 % at ``solo``; layerkv 5x at ``long``."""
    out: list[str] = []
    vllm = by_label.get(our_label("vllm"))
    if setting == "solo" and vllm is not None:
        out.append(_check(vllm.mean_e2e_ratio <= 1.10,
                          f"ours-vllm mean per-request time within 10 % of real vLLM "
                          f"({vllm.mean_e2e_ratio:.2f}x)"))
    if setting in ("kv1", "kv3") and vllm is not None:
        out.append(_check(abs(vllm.mean_ttft_ratio - 1) <= 0.15,
                          f"ours-vllm mean TTFT within 15 % of real vLLM ({vllm.mean_ttft_ratio:.2f}x)"))
        out.append(_check(abs(vllm.throughput_ratio - 1) <= 0.15,
                          f"ours-vllm throughput within 15 % of real vLLM ({vllm.throughput_ratio:.2f}x)"))
    lkv = by_label.get(our_label("layerkv"))
    if setting == "long" and lkv is not None:
        out.append(_check(lkv.mean_ttft_speedup >= 5.0,
                          f"ours-layerkv mean TTFT >= 5x lower than real vLLM "
                          f"({lkv.mean_ttft_speedup:.2f}x)"))
        out.append(_check(lkv.tpot_attainment_delta_points >= -2.0,
                          f"ours-layerkv TPOT SLO within 2 points "
                          f"({lkv.tpot_attainment_delta_points:+.1f} pt)"))
        out.append(_check(lkv.throughput_ratio >= 0.99,
                          f"ours-layerkv throughput >= 99 % of real vLLM ({lkv.throughput_ratio:.3f}x)"))
    return out


def setting_report(
    setting: str, runs: Sequence[SystemRun], ttft_slo_s: float, tpot_slo_s: float
) -> SettingReport:
    """Summaries of every run; ratios against the ``real-vllm`` run (when there is one)."""
    summaries = [summarize(r.label, r.results, ttft_slo_s, tpot_slo_s) for r in runs]
    base = next((s for s in summaries if s.policy == REAL_VLLM), None)
    rs = [] if base is None else [ratios(base, s) for s in summaries if s.policy != REAL_VLLM]
    unloaded = {r.label: _first_request(r.results) for r in runs}
    return SettingReport(setting, summaries, {r.label: r.preemptions for r in runs}, rs,
                         targets_for(setting, {r.label: r for r in rs}), unloaded)


def _first_request(results: Sequence[RequestResult]) -> tuple[float | None, float | None]:
    first = min(results, key=lambda r: r.sent_s, default=None)
    if first is None or not first.ok:
        return (None, None)
    return (first.ttft_s, first.tpot_s)


def unloaded_line(report: SettingReport) -> str:
    """``system TTFT/TPOT`` of the request that found the system empty, for every system."""
    parts = [f"{label} {_ms(t) if t is not None else '-'} / {_ms(p) if p is not None else '-'}"
             for label, (t, p) in report.unloaded.items()]
    return "unloaded engine speed (request 0, empty system), TTFT / TPOT: " + ", ".join(parts)


def _ms(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1.0 else f"{v:.2f} s"


def _x(v: float) -> str:
    return f"{v:.2f}x" if math.isfinite(v) else "-"


def table_rows(report: SettingReport) -> list[list[str]]:
    """Header + one row per system: the figures the issue asks for."""
    rows = [["system", "TTFT mean / P50 / P99", "TPOT mean / P50 / P99", "TPOT SLO", "tok/s",
             "preempt", "done"]]
    for s in report.summaries:
        pre = report.preemptions.get(s.policy)
        rows.append([
            s.policy,
            f"{_ms(s.ttft.mean)} / {_ms(s.ttft.p50)} / {_ms(s.ttft.p99)}",
            f"{_ms(s.tpot.mean)} / {_ms(s.tpot.p50)} / {_ms(s.tpot.p99)}",
            f"{100 * s.tpot_attainment:.1f} %" if math.isfinite(s.tpot_attainment) else "-",
            f"{s.throughput_tokens_s:.1f}",
            "n/a" if pre is None else f"{pre:g}",
            f"{s.completed}/{s.requests}",
        ])
    return rows


def ratio_rows(report: SettingReport) -> list[list[str]]:
    rows = [["vs real vLLM", "mean TTFT (ours/vLLM)", "TTFT speedup", "P99 TTFT", "mean TPOT",
             "TPOT SLO delta", "throughput", "mean e2e"]]
    for r in report.ratios:
        rows.append([r.label, _x(r.mean_ttft_ratio), _x(r.mean_ttft_speedup), _x(r.p99_ttft_ratio),
                     _x(r.mean_tpot_ratio), f"{r.tpot_attainment_delta_points:+.1f} pt"
                     if math.isfinite(r.tpot_attainment_delta_points) else "-", _x(r.throughput_ratio),
                     _x(r.mean_e2e_ratio)])
    return rows


def format_rows(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def clean(value: object) -> object:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def setting_json(
    report: SettingReport, runs: Sequence[SystemRun], info: dict[str, object]
) -> dict[str, object]:
    """One setting's JSON: its parameters (``info``), summaries, ratios, targets and every request."""
    doc = {
        **info,
        "setting": report.setting,
        "summaries": [asdict(s) for s in report.summaries],
        "preemptions": report.preemptions,
        "ratios_vs_real_vllm": [asdict(r) for r in report.ratios],
        "targets": report.targets,
        "unloaded_request0": {k: {"ttft_s": t, "tpot_s": p} for k, (t, p) in report.unloaded.items()},
        "requests": {r.label: [{**asdict(x), "ttft_s": x.ttft_s, "tpot_s": x.tpot_s} for x in r.results]
                     for r in runs},
    }
    cleaned = clean(doc)
    assert isinstance(cleaned, dict)
    return cleaned
