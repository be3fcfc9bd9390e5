"""Prometheus metrics of one worker: KV block usage per tier and layer, copies, steps, dispatches.

The shared series come from ``common.metrics.ServiceMetrics`` (same names as the scheduler's, one
dashboard for both); the worker adds step durations and copy waits. Each worker owns its registry,
so several workers can live in one test process. Updated on the event loop from each step's
report, never from the engine thread.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from common.metrics import LATENCY_BUCKETS, ServiceMetrics
from worker_svc.outputs import KVUsage, StepOutput


class WorkerMetrics:
    """The worker's series, labelled by worker id."""

    def __init__(self, worker_id: str) -> None:
        self.service = ServiceMetrics("worker")
        self.registry = self.service.registry
        self._worker_id = worker_id
        self._step_seconds = Histogram(
            "layerkv_worker_step_seconds", "Engine step duration", ["worker", "kind"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._copy_wait = Counter(
            "layerkv_worker_copy_wait_seconds", "Time compute waited for KV copies", ["worker"],
            registry=self.registry,
        )
        self._preemptions = Counter(
            "layerkv_worker_preemptions", "Requests preempted when KV growth found no room", ["worker"],
            registry=self.registry,
        )
        self._swapped_layers = Counter(
            "layerkv_worker_swapped_layers", "Layers moved GPU -> host by swap-layers preemption", ["worker"],
            registry=self.registry,
        )

    def dispatch_accepted(self) -> None:
        self.service.dispatches.labels(self._worker_id).inc()

    def dispatch_refused(self) -> None:
        self.service.dispatches_refused.labels(self._worker_id).inc()

    def observe_usage(self, usage: KVUsage) -> None:
        for tier, u in (("gpu", usage.gpu), ("host", usage.host)):
            self.service.observe_usage(self._worker_id, tier, u.used_per_layer, u.free_blocks)

    def observe_step(self, out: StepOutput) -> None:
        w, s = self._worker_id, out.stats
        self._step_seconds.labels(w, s.kind).observe(s.duration_s)
        self.service.bytes_offloaded.labels(w).inc(s.bytes_offloaded)
        self.service.bytes_loaded.labels(w).inc(s.bytes_loaded)
        self._copy_wait.labels(w).inc(s.copy_wait_s)
        self._preemptions.labels(w).inc(s.num_preemptions)
        self._swapped_layers.labels(w).inc(s.num_swapped_layers)
        self.service.running.labels(w).set(len(out.running))
        for o in out.outputs:
            if o.finished and o.finish_reason is not None:
                self.service.requests.labels(o.finish_reason.value).inc()
        self.observe_usage(out.usage)
