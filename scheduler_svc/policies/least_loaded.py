"""The ``least-loaded`` policy: simple and placement-aware.

Each waiting request (in arrival order) goes to the accepting worker with the most free GPU blocks.
If the whole request does not fit there on the GPU, as many layers as fit stay on the GPU —
spread through the depth by ``common.placement.interleaved`` — and the rest go to host blocks.
Like ``fcfs-full`` it reserves the whole request (``headroom_tokens = max_tokens``).
No SLO reasoning: that is the ``layerkv`` policy's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from common import kv_budget
from common.placement import interleaved
from common.types import Placement
from scheduler_svc.policies.base import (
    Dispatch,
    FleetSnapshot,
    Policy,
    PolicyParams,
    PreemptionMode,
    WorkerSnapshot,
)


class LeastLoadedParams(PolicyParams):
    """Parameters of ``least-loaded``."""

    allow_host_layers: bool = Field(True, description="place layers on the host when the GPU is short")
    skip_blocked: bool = Field(
        False, description="let later requests overtake one that fits no worker now (False: strict order)"
    )


class LeastLoadedPolicy(Policy):
    name: ClassVar[str] = "least-loaded"
    description: ClassVar[str] = (
        "worker with the most free GPU blocks; layers that do not fit on its GPU go to host memory "
        "(interleaved); no SLO-aware admission"
    )
    Params: ClassVar[type[PolicyParams]] = LeastLoadedParams
    reads_cost_model: ClassVar[bool] = False

    def schedule(self, fleet: FleetSnapshot) -> Sequence[Dispatch]:
        params = self.params
        assert isinstance(params, LeastLoadedParams), f"least-loaded takes LeastLoadedParams, got {params!r}"
        gpu_free = {w.worker_id: w.gpu_blocks_free for w in fleet.workers if w.accepting}
        host_free = {w.worker_id: w.host_blocks_free for w in fleet.workers if w.accepting}
        dispatches: list[Dispatch] = []
        for req in fleet.waiting:
            tokens = req.num_prompt_tokens + req.max_tokens
            choice: tuple[WorkerSnapshot, Placement] | None = None
            for w in sorted(
                (w for w in fleet.workers if w.worker_id in gpu_free),
                key=lambda w: gpu_free[w.worker_id],
                reverse=True,
            ):
                if tokens > w.max_model_len:
                    continue
                placement = self._placement(w, tokens, gpu_free[w.worker_id], host_free[w.worker_id], params)
                if placement is not None:
                    choice = (w, placement)
                    break
            if choice is None:
                if params.skip_blocked:
                    continue
                break
            worker, placement = choice
            need = kv_budget.demand(worker.geometry, tokens, placement)
            gpu_free[worker.worker_id] -= need.gpu_blocks
            host_free[worker.worker_id] -= need.host_blocks
            dispatches.append(
                Dispatch(
                    req.request_id,
                    worker.worker_id,
                    placement,
                    headroom_tokens=req.max_tokens,
                    preemption=PreemptionMode.RECOMPUTE,
                )
            )
        return dispatches

    @staticmethod
    def _placement(
        w: WorkerSnapshot, tokens: int, gpu_free: int, host_free: int, params: LeastLoadedParams
    ) -> Placement | None:
        layers = w.geometry.num_layers
        per_layer = kv_budget.blocks_per_layer(w.geometry, tokens)
        if per_layer * layers <= gpu_free:
            return Placement.all_gpu(layers)
        if not params.allow_host_layers:
            return None
        resident = min(layers, gpu_free // per_layer) if per_layer else layers
        if per_layer * (layers - resident) > host_free:
            return None
        return interleaved(layers, resident)
