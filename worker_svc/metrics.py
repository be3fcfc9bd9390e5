"""Prometheus metrics of one worker: what only the worker knows, under ``layerkv_worker_*`` names.

Its own KV blocks per tier and layer, step durations and sizes, copies between the tiers and the
time compute waited for them, dispatches it took or refused, preemptions. Request latencies and
token counts are the scheduler's series (``common.metrics``): the scheduler sees a request from
arrival to finish across failovers, the worker sees one attempt. Each worker owns its registry, so
several workers (and a scheduler) can live in one process; updated on the event loop from each
step's report, never from the engine thread. The labelled series a step touches are looked up once
and kept, and the per-layer block gauges are set only when the usage changed: the loop's work per
step is time the engine thread can wait for the GIL.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import LATENCY_BUCKETS
from worker_svc.outputs import KVUsage, StepOutput

P = "layerkv_worker"
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class WorkerMetrics:
    """The worker's series, labelled by worker id."""

    def __init__(self, worker_id: str) -> None:
        r = self.registry = CollectorRegistry()
        w = self._worker_id = worker_id
        self._step_seconds = Histogram(f"{P}_step_seconds", "Engine step duration", ["worker", "kind"],
                                       buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self._step_tokens = Histogram(f"{P}_step_tokens", "Tokens computed per step (prefill: prompt tokens; "
                                      "decode: requests)", ["worker", "kind"], buckets=STEP_TOKEN_BUCKETS,
                                      registry=r)  # fmt: skip
        self._copy_wait = Counter(f"{P}_copy_wait_seconds", "Time compute waited for KV copies", ["worker"],
                                  registry=r).labels(w)  # fmt: skip
        self._offloaded = Counter(f"{P}_bytes_offloaded", "KV bytes copied device-to-host", ["worker"],
                                  registry=r).labels(w)  # fmt: skip
        self._loaded = Counter(f"{P}_bytes_loaded", "KV bytes copied host-to-device", ["worker"],
                               registry=r).labels(w)  # fmt: skip
        self._preemptions = Counter(f"{P}_preemptions", "Running requests preempted to free KV blocks",
                                    ["worker"], registry=r).labels(w)  # fmt: skip
        self._swapped_layers = Counter(f"{P}_swapped_layers", "Layers moved GPU -> host by swap-layers "
                                       "preemption", ["worker"], registry=r).labels(w)  # fmt: skip
        self._dispatches = Counter(f"{P}_dispatches", "Dispatches accepted", ["worker"], registry=r).labels(w)
        self._refused = Counter(f"{P}_dispatches_refused", "Dispatches refused (no room)", ["worker"],
                                registry=r).labels(w)  # fmt: skip
        self._running = Gauge(f"{P}_running_requests", "Requests running in the engine", ["worker"],
                              registry=r).labels(w)  # fmt: skip
        self._finished = Counter(f"{P}_requests_finished", "Requests the engine finished, by reason",
                                 ["worker", "reason"], registry=r)  # fmt: skip
        self._blocks_used = Gauge(f"{P}_kv_blocks_used", "KV blocks in use per tier and layer",
                                  ["worker", "tier", "layer"], registry=r)  # fmt: skip
        self._blocks_free = Gauge(f"{P}_kv_blocks_free", "Free KV blocks per tier", ["worker", "tier"],
                                  registry=r)  # fmt: skip
        self._by_kind: dict[str, tuple[Histogram, Histogram]] = {}  # step kind -> (seconds, tokens)
        self._usage_children: dict[str, tuple[list[Gauge], Gauge]] = {}  # tier -> (per layer, free)
        self._last_usage: KVUsage | None = None  # the usage last exported

    def dispatch_accepted(self) -> None:
        self._dispatches.inc()

    def dispatch_refused(self) -> None:
        self._refused.inc()

    def observe_usage(self, usage: KVUsage) -> None:
        if usage == self._last_usage:  # most decode steps cross no block boundary
            return
        self._last_usage = usage
        for tier, u in (("gpu", usage.gpu), ("host", usage.host)):
            children = self._usage_children.get(tier)
            if children is None or len(children[0]) != len(u.used_per_layer):
                children = self._usage_children[tier] = (
                    [self._blocks_used.labels(self._worker_id, tier, str(layer))
                     for layer in range(len(u.used_per_layer))],
                    self._blocks_free.labels(self._worker_id, tier),
                )
            for gauge, used in zip(children[0], u.used_per_layer, strict=True):
                gauge.set(used)
            children[1].set(u.free_blocks)

    def observe_step(self, out: StepOutput) -> None:
        w, s = self._worker_id, out.stats
        series = self._by_kind.get(s.kind)
        if series is None:
            series = self._by_kind[s.kind] = (self._step_seconds.labels(w, s.kind),
                                              self._step_tokens.labels(w, s.kind))
        series[0].observe(s.duration_s)
        if s.kind != "idle":
            series[1].observe(s.num_tokens)
        self._offloaded.inc(s.bytes_offloaded)
        self._loaded.inc(s.bytes_loaded)
        self._copy_wait.inc(s.copy_wait_s)
        self._preemptions.inc(s.num_preemptions)
        self._swapped_layers.inc(s.num_swapped_layers)
        self._running.set(len(out.running))
        for o in out.outputs:
            if o.finished and o.finish_reason is not None:
                self._finished.labels(w, o.finish_reason.value).inc()
        self.observe_usage(out.usage)
