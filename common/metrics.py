"""Prometheus metrics of both services and the helper that serves ``/metrics``.

Each service instance owns its own ``CollectorRegistry`` (several servers can live in one process,
as in the tests). Latencies are histograms in seconds; block usage is a gauge per worker, tier and
layer; bytes moved between tiers and refused dispatches are counters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Seconds: from a few milliseconds (tiny CPU models) to minutes (queueing of long prompts).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.2, 0.5, 1, 2.5)


@dataclass
class ServiceMetrics:
    """The metrics of one service process (scheduler or worker); ``component`` labels nothing."""

    component: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        p = "layerkv"
        self.ttft = Histogram(
            f"{p}_ttft_seconds", "Arrival to first token", registry=r, buckets=LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            f"{p}_tpot_seconds",
            "Mean time per output token after the first",
            registry=r,
            buckets=TPOT_BUCKETS,
        )
        self.queue_time = Histogram(
            f"{p}_queue_seconds", "Arrival to dispatch", registry=r, buckets=LATENCY_BUCKETS
        )
        self.e2e = Histogram(f"{p}_latency_seconds", "Arrival to finish", registry=r, buckets=LATENCY_BUCKETS)
        self.queue_length = Gauge(f"{p}_queue_length", "Requests waiting for dispatch", registry=r)
        self.running = Gauge(f"{p}_running_requests", "Requests running", ["worker"], registry=r)
        self.blocks_used = Gauge(
            f"{p}_kv_blocks_used",
            "KV blocks in use per worker, tier and layer",
            ["worker", "tier", "layer"],
            registry=r,
        )
        self.blocks_free = Gauge(
            f"{p}_kv_blocks_free", "Free KV blocks per tier", ["worker", "tier"], registry=r
        )
        self.bytes_offloaded = Counter(
            f"{p}_bytes_offloaded", "KV bytes copied device-to-host", ["worker"], registry=r
        )
        self.bytes_loaded = Counter(
            f"{p}_bytes_loaded", "KV bytes copied host-to-device", ["worker"], registry=r
        )
        self.dispatches = Counter(
            f"{p}_dispatches", "Dispatches accepted by a worker", ["worker"], registry=r
        )
        self.dispatches_refused = Counter(
            f"{p}_dispatches_refused", "Dispatches a worker refused (no room)", ["worker"], registry=r
        )
        self.requests = Counter(f"{p}_requests_finished", "Finished requests", ["reason"], registry=r)
        self.requeues = Counter(f"{p}_requeues", "Requests requeued after a worker failure", registry=r)
        self.preemptions = Counter(
            f"{p}_preemptions", "Requests preempted (recompute or swap-layers)", ["worker"], registry=r
        )

    def observe_usage(self, worker: str, tier: str, used_per_layer: Sequence[int], free: int) -> None:
        for layer, used in enumerate(used_per_layer):
            self.blocks_used.labels(worker, tier, str(layer)).set(used)
        self.blocks_free.labels(worker, tier).set(free)


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` on ``port`` in a daemon thread (0 → disabled); return the port or 0."""
    if port == 0:
        log.info("metrics endpoint disabled (--metrics-port 0)")
        return 0
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound
