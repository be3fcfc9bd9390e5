"""The scheduler's state as the scrape-time vLLM-style gauges read it (``common.metrics.FleetView``).

Running requests are those dispatched and not finished, waiting ones are the queue, and KV usage is
the fleet's GPU blocks in use over its GPU blocks, as the healthy workers last reported them. The
model name labels every vLLM-style series: the served name when one is configured, else the
workers' model.
"""

from __future__ import annotations

from scheduler_svc.core import SchedulerCore
from scheduler_svc.requests import RUNNING


class CoreFleetView:
    def __init__(self, core: SchedulerCore, served_model_name: str = "") -> None:
        self._core = core
        self._served = served_model_name

    def model_name(self) -> str:
        if self._served:
            return self._served
        return next((h.description.model for h in self._core.pool.handles() if h.description is not None), "")

    def num_running(self) -> int:
        return sum(1 for s in self._core.requests.values() if s.record.status == RUNNING)

    def num_waiting(self) -> int:
        return len(self._core.queue)

    def gpu_kv_usage(self) -> float:
        workers = self._core.ledger.workers()
        total = sum(w.gpu.total_blocks for w in workers)
        used = sum(w.gpu.total_blocks - w.gpu.free_blocks for w in workers)
        return used / total if total else 0.0
