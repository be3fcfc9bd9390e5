"""The worker's Prometheus series follow its step reports (kept children, usage set on change)."""

from __future__ import annotations

from worker_svc.metrics import WorkerMetrics
from worker_svc.outputs import KVUsage, StepOutput, StepStats, TierUsage


def _step(kind: str, gpu_used: tuple[int, ...], duration_s: float = 0.01) -> StepOutput:
    gpu = TierUsage(40, 40 - sum(gpu_used), gpu_used)
    host = TierUsage(8, 8, (0,) * len(gpu_used))
    return StepOutput(outputs=(), admitted=(), running=(),
                      stats=StepStats(1, kind, duration_s, 3, 0, 0, 0.0, num_decode_requests=3),
                      usage=KVUsage(gpu, host))


def test_step_series_and_block_gauges_follow_every_step() -> None:
    m = WorkerMetrics("w0")

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, {"worker": "w0", **labels})

    m.observe_step(_step("decode", (2, 3)))
    m.observe_step(_step("decode", (2, 3)))  # unchanged usage
    m.observe_step(_step("prefill", (4, 5), duration_s=0.5))
    assert value("layerkv_worker_step_seconds_count", kind="decode") == 2
    assert value("layerkv_worker_step_seconds_count", kind="prefill") == 1
    assert value("layerkv_worker_step_seconds_sum", kind="prefill") == 0.5
    assert value("layerkv_worker_step_tokens_count", kind="decode") == 2
    assert value("layerkv_worker_kv_blocks_used", tier="gpu", layer="0") == 4
    assert value("layerkv_worker_kv_blocks_used", tier="gpu", layer="1") == 5
    assert value("layerkv_worker_kv_blocks_free", tier="gpu") == 31
    m.observe_step(_step("decode", (2, 3)))  # back to an earlier usage: set again
    assert value("layerkv_worker_kv_blocks_used", tier="gpu", layer="1") == 3
    assert value("layerkv_worker_kv_blocks_free", tier="gpu") == 35
    assert value("layerkv_worker_kv_blocks_free", tier="host") == 8


def test_stack_overhead_reads_the_step_series_of_a_worker_page() -> None:
    """``benchmarks/stack_overhead.py`` takes a request's prefill and decode steps from the
    worker's metrics page, read before and after it."""
    from prometheus_client import generate_latest

    from benchmarks.stack_overhead import step_totals, steps_between

    m = WorkerMetrics("w0")
    before = step_totals(generate_latest(m.registry).decode())
    m.observe_step(_step("prefill", (4, 5), duration_s=0.25))
    for _ in range(3):
        m.observe_step(_step("decode", (4, 5), duration_s=0.125))
    after = step_totals(generate_latest(m.registry).decode())
    assert steps_between(before, after, "prefill") == (0.25, 1)
    assert steps_between(before, after, "decode") == (0.375, 3)
    assert steps_between(after, after, "decode") == (0.0, 0)
