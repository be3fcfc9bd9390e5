"""Prometheus metrics of the scheduler, and the helper that serves ``/metrics``.

Each service instance owns its own ``CollectorRegistry`` (several servers can live in one process,
as in the tests), and registers only series it sets: the scheduler's are here, the worker's in
``worker_svc.metrics`` under ``layerkv_worker_*`` names, so the two never clash. Next to our own
series the scheduler exports the vLLM-style ones dashboards and gateways already read
(``vllm:time_to_first_token_seconds``, ``vllm:num_requests_waiting``, ...; labelled
``model_name``), observed at the same moments as their ``layerkv_*`` twins. Latencies are
histograms in seconds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Seconds: from a few milliseconds (tiny CPU models) to minutes (queueing of long prompts).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.2, 0.5, 1, 2.5)
TRACKED_REQUESTS = 100_000  # requests whose last token time is kept for inter-token latencies
VLLM = "vllm:"


class FleetView(Protocol):
    """What the scrape-time vLLM-style gauges read from a running scheduler."""

    def model_name(self) -> str: ...

    def num_running(self) -> int: ...

    def num_waiting(self) -> int: ...

    def gpu_kv_usage(self) -> float:
        """Fraction (0..1) of the fleet's GPU KV blocks in use, as the workers last reported."""
        ...


class _Twin:
    """Our histogram and its vLLM-style twin, observed together."""

    def __init__(self, ours: Histogram, theirs: Histogram, metrics: SchedulerMetrics) -> None:
        self._ours, self._theirs, self._metrics = ours, theirs, metrics

    def observe(self, seconds: float) -> None:
        self._ours.observe(seconds)
        self._metrics.series(self._theirs, self._metrics.model_name()).observe(seconds)


class _FleetGauges(Collector):
    """``vllm:num_requests_running``/``_waiting`` and ``vllm:kv_cache_usage_perc``, read at scrape."""

    def __init__(self, view: FleetView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        model = self._view.model_name()
        for name, doc, value in (
            ("num_requests_running", "Requests running on a worker", float(self._view.num_running())),
            ("num_requests_waiting", "Requests waiting for dispatch", float(self._view.num_waiting())),
            ("kv_cache_usage_perc", "GPU KV-cache usage (1 means 100 percent)", self._view.gpu_kv_usage()),
        ):
            family = GaugeMetricFamily(VLLM + name, doc, labels=["model_name"])
            family.add_metric([model], value)
            yield family


@dataclass
class SchedulerMetrics:
    """The series of one scheduler. ``component`` names the service in logs only."""

    component: str = "scheduler"
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self._view: FleetView | None = None
        self._last_token: OrderedDict[str, float] = OrderedDict()
        self._usage: dict[tuple[str, str], tuple[tuple[int, ...], int]] = {}  # last usage exported
        self._usage_children: dict[tuple[str, str], list[Gauge]] = {}  # its per-layer series
        self._series: dict[tuple[object, tuple[str, ...]], Any] = {}  # (metric, labels) -> its series
        v = ["model_name"]

        def hist(name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS,
                 ) -> Histogram:  # fmt: skip
            return Histogram(name, doc, labels, registry=r, buckets=buckets)

        def count(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.ttft = _Twin(hist("layerkv_ttft_seconds", "Arrival to first token"),
                          hist(f"{VLLM}time_to_first_token_seconds", "Time to first token", v), self)
        self.tpot = _Twin(hist("layerkv_tpot_seconds", "Mean time per output token after the first",
                               buckets=TPOT_BUCKETS),
                          hist(f"{VLLM}request_time_per_output_token_seconds",
                               "Mean time per output token of a request", v, TPOT_BUCKETS), self)
        self.queue_time = _Twin(hist("layerkv_queue_seconds", "Arrival to dispatch"),
                                hist(f"{VLLM}request_queue_time_seconds", "Arrival to dispatch", v), self)
        self.e2e = _Twin(hist("layerkv_latency_seconds", "Arrival to finish"),
                         hist(f"{VLLM}e2e_request_latency_seconds", "Arrival to finish", v), self)
        self._itl = hist(f"{VLLM}inter_token_latency_seconds", "Time between tokens of a request", v,
                         TPOT_BUCKETS)
        self._prompt_tokens = count(f"{VLLM}prompt_tokens", "Prompt tokens prefilled", v)
        self._generation_tokens = count(f"{VLLM}generation_tokens", "Tokens generated", v)
        self._preemptions = count(f"{VLLM}num_preemptions", "Requests preempted by a worker", v)
        self._preempted = count("layerkv_preemptions", "Requests preempted, per worker", ["worker"])
        self.queue_length = gauge("layerkv_queue_length", "Requests waiting for dispatch")
        self.running = gauge("layerkv_running_requests", "Requests running", ["worker"])
        self.blocks_used = gauge("layerkv_kv_blocks_used", "KV blocks in use per worker, tier and layer",
                                 ["worker", "tier", "layer"])
        self.blocks_free = gauge("layerkv_kv_blocks_free", "Free KV blocks per tier", ["worker", "tier"])
        self.bytes_offloaded = count("layerkv_bytes_offloaded", "KV bytes copied device-to-host", ["worker"])
        self.bytes_loaded = count("layerkv_bytes_loaded", "KV bytes copied host-to-device", ["worker"])
        self.dispatches = count("layerkv_dispatches", "Dispatches accepted by a worker", ["worker"])
        self.dispatches_refused = count("layerkv_dispatches_refused", "Dispatches a worker refused (no room)",
                                        ["worker"])
        self.requests = count("layerkv_requests_finished", "Finished requests", ["reason"])
        self.requeues = count("layerkv_requeues", "Requests requeued after a worker failure")

    def bind(self, view: FleetView) -> None:
        """Start exporting the scrape-time gauges of ``view`` and label series with its model."""
        self._view = view
        self.registry.register(_FleetGauges(view))

    def model_name(self) -> str:
        return self._view.model_name() if self._view is not None else ""

    def series(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: the scheduler observes a few labelled series several
        times per request, and prometheus_client's ``labels()`` validates and locks on every call
        (about 1.8 us, against 0.1 for this lookup). Series are never removed, so a kept one stays
        the one exported."""
        key = (metric, labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return child

    def observe_usage(self, worker: str, tier: str, used_per_layer: Sequence[int], free: int) -> None:
        # Called per worker step with a value per layer: set only the layers that changed (a
        # labels() lookup per layer per step was most of the event path's metrics time).
        key = (worker, tier)
        last = self._usage.get(key)
        used = tuple(used_per_layer)
        if last is not None and last[0] == used and last[1] == free:
            return
        children = self._usage_children.get(key)
        if children is None or len(children) != len(used):
            children = [self.blocks_used.labels(worker, tier, str(layer)) for layer in range(len(used))]
            self._usage_children[key] = children
            last = None
        for layer, (child, value) in enumerate(zip(children, used, strict=True)):
            if last is None or layer >= len(last[0]) or last[0][layer] != value:
                child.set(value)
        self.blocks_free.labels(worker, tier).set(free)
        self._usage[key] = (used, free)

    def observe_tokens(self, request_id: str, count: int, prompt_tokens: int, now: float) -> None:
        """``count`` new tokens of a request arrived at ``now`` (seconds since the epoch)."""
        if count <= 0:
            return
        model = self.model_name()
        last = self._last_token.pop(request_id, None)
        if last is None:  # its first tokens: the prompt has been prefilled
            self.series(self._prompt_tokens, model).inc(prompt_tokens)
        else:
            self.series(self._itl, model).observe(max(0.0, now - last))
        self._last_token[request_id] = now
        while len(self._last_token) > TRACKED_REQUESTS:  # finished requests age out
            self._last_token.popitem(last=False)
        self.series(self._generation_tokens, model).inc(count)

    def preempted(self, worker: str, count: int = 1) -> None:
        """A worker preempted ``count`` running requests (from its step reports)."""
        if count > 0:
            self.series(self._preemptions, self.model_name()).inc(count)
            self.series(self._preempted, worker).inc(count)


ServiceMetrics = SchedulerMetrics  # the name the scheduler's modules import


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` on ``port`` in a daemon thread (0 → disabled); return the port or 0."""
    if port == 0:
        log.info("metrics endpoint disabled (--metrics-port 0)")
        return 0
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound
