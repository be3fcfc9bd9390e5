"""The ``fcfs-full`` baseline: vLLM-style admission with no layer-wise placement.

Requests go in arrival order; one is dispatched only when some worker has free GPU blocks for the
whole request (prompt plus ``max_tokens``, the blocks the engine reserves) in every layer, all on
the GPU. When the head of the queue does not fit, nothing behind it goes either (head-of-line
blocking, as in vLLM). A request that could not fit an *empty* worker's GPU tier is skipped
instead of blocking the queue forever (it waits for a placement-aware policy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from common.types import Placement
from scheduler_svc.policies.base import Dispatch, FleetSnapshot, Policy, PolicyParams


class FcfsFullParams(PolicyParams):
    """``fcfs-full`` has no parameters."""


class FcfsFullPolicy(Policy):
    name: ClassVar[str] = "fcfs-full"
    description: ClassVar[str] = (
        "vLLM-style baseline: first come first served, dispatch only when a worker has GPU blocks "
        "for the whole request in every layer; no host layers"
    )
    Params: ClassVar[type[PolicyParams]] = FcfsFullParams

    def reservation(self, num_layers: int) -> Placement | None:
        return Placement.all_gpu(num_layers)

    def schedule(self, fleet: FleetSnapshot) -> Sequence[Dispatch]:
        free = {w.worker_id: w.gpu_blocks_free for w in fleet.workers if w.accepting}
        workers = [w for w in fleet.workers if w.accepting]
        dispatches: list[Dispatch] = []
        for req in fleet.waiting:
            tokens = req.num_prompt_tokens + req.max_tokens
            best = None
            ever_fits = False
            for w in workers:
                need = w.geometry.blocks_for(tokens) * w.geometry.num_layers
                if tokens > w.max_model_len or need > w.gpu_blocks_total:
                    continue
                ever_fits = True
                if need <= free[w.worker_id] and (best is None or free[w.worker_id] > free[best.worker_id]):
                    best = w
            if best is None:
                if ever_fits:
                    break  # head-of-line blocking: nobody overtakes a request that will fit later
                continue
            free[best.worker_id] -= best.geometry.blocks_for(tokens) * best.geometry.num_layers
            placement = Placement.all_gpu(best.geometry.num_layers)
            dispatches.append(Dispatch(req.request_id, best.worker_id, placement))
        return dispatches
