"""The ``fcfs-full`` baseline: the paper's older vLLM-style admission, whole-request reservation.

Requests go in arrival order; one is dispatched only when some worker has free GPU blocks for the
whole request (prompt plus ``max_tokens``) in every layer, all on the GPU, and the ledger keeps
that whole reservation as growth headroom (``headroom_tokens = max_tokens``), so a running request
always has room to grow and nothing is ever preempted. When the head of the queue does not fit,
nothing behind it goes either (head-of-line blocking). A request that could not fit an *empty*
worker's GPU tier is skipped instead of blocking the queue forever (it waits for a placement-aware
policy). The engine's on-demand growth with vLLM v1's admission is the ``vllm`` policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from common.types import Placement
from scheduler_svc.policies.base import (
    Dispatch,
    FleetSnapshot,
    Policy,
    PolicyParams,
    PreemptionMode,
    all_gpu_blocks,
    fits_empty_gpu,
)


class FcfsFullParams(PolicyParams):
    """``fcfs-full`` has no parameters."""


class FcfsFullPolicy(Policy):
    name: ClassVar[str] = "fcfs-full"
    description: ClassVar[str] = (
        "older vLLM-style baseline: first come first served, dispatch only when a worker has GPU "
        "blocks for the whole request (prompt + max_tokens) in every layer; no host layers"
    )
    Params: ClassVar[type[PolicyParams]] = FcfsFullParams
    reads_cost_model: ClassVar[bool] = False

    def reservation(self, num_layers: int) -> Placement | None:
        return Placement.all_gpu(num_layers)

    def schedule(self, fleet: FleetSnapshot) -> Sequence[Dispatch]:
        free = {w.worker_id: w.gpu_blocks_free for w in fleet.workers if w.accepting}
        workers = [w for w in fleet.workers if w.accepting]
        dispatches: list[Dispatch] = []
        for req in fleet.waiting:
            tokens = req.num_prompt_tokens + req.max_tokens
            best = None
            best_need = 0
            ever_fits = False
            for w in workers:
                if not fits_empty_gpu(w, tokens):
                    continue
                ever_fits = True
                need = all_gpu_blocks(w, tokens)
                if need <= free[w.worker_id] and (best is None or free[w.worker_id] > free[best.worker_id]):
                    best, best_need = w, need
            if best is None:
                if ever_fits:
                    break  # head-of-line blocking: nobody overtakes a request that will fit later
                continue
            free[best.worker_id] -= best_need
            placement = Placement.all_gpu(best.geometry.num_layers)
            dispatches.append(
                Dispatch(
                    req.request_id,
                    best.worker_id,
                    placement,
                    headroom_tokens=req.max_tokens,
                    preemption=PreemptionMode.RECOMPUTE,
                )
            )
        return dispatches
