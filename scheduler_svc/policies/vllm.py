"""The ``vllm`` policy: vLLM v1's admission on our engine, the baseline LayerKV is measured against.

First come first served over the waiting queue, every layer on the GPU. A request is admitted
while its *prompt's* blocks fit the worker's free GPU blocks (no ``max_tokens`` reservation, no
headroom: ``headroom_tokens = 0``); decode grows on demand, and when growth fails the worker
preempts by recompute (the newest running request is dropped and re-prefilled ahead of new
arrivals: no new dispatch goes to a worker while its preempted requests wait). The worker's
chunked prefill (``max_num_batched_tokens``) shares each step between prompt chunks and decodes.
At most ``max_num_seqs`` requests per worker. Like vLLM v1's scheduler
the round stops at the first waiting request that does not fit (head-of-line); a request that
could not be held even by an empty worker's GPU tier is skipped instead (vLLM rejects those).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from common.types import Placement
from scheduler_svc.policies.base import (
    Dispatch,
    FleetSnapshot,
    Policy,
    PolicyParams,
    PreemptionMode,
    WorkerSnapshot,
    all_gpu_blocks,
    fits_empty_gpu,
)


class VllmParams(PolicyParams):
    """Parameters of ``vllm`` (vLLM's own defaults)."""

    max_num_seqs: int = Field(
        default=256,
        ge=1,
        le=1 << 16,
        description="most requests one worker holds at once (running, preempted or dispatched), "
        "as vLLM's max_num_seqs",
    )


class VllmPolicy(Policy):
    name: ClassVar[str] = "vllm"
    description: ClassVar[str] = (
        "vLLM v1: first come first served, admit while the prompt's blocks fit the GPU (no "
        "max_tokens reservation), grow on demand, recompute preemption, chunked prefill"
    )
    Params: ClassVar[type[PolicyParams]] = VllmParams
    reads_cost_model: ClassVar[bool] = False

    def schedule(self, fleet: FleetSnapshot) -> Sequence[Dispatch]:
        params = self.params
        assert isinstance(params, VllmParams), f"vllm takes VllmParams, got {params!r}"
        workers = [w for w in fleet.workers if w.accepting]
        free = {w.worker_id: w.gpu_blocks_free for w in workers}
        held = {w.worker_id: max(w.requests_held, len(w.running)) for w in workers}
        dispatches: list[Dispatch] = []
        for req in fleet.waiting:
            candidates = [w for w in workers if fits_empty_gpu(w, req.num_prompt_tokens + req.max_tokens)]
            if not candidates:
                continue  # no empty worker could hold it: it must not block the queue forever
            best: WorkerSnapshot | None = None
            best_need = 0
            for w in candidates:
                need = all_gpu_blocks(w, req.num_prompt_tokens)
                if w.requests_preempted or held[w.worker_id] >= params.max_num_seqs:
                    continue  # preempted requests go first, as at the head of vLLM's queue
                if need > free[w.worker_id]:
                    continue
                if best is None or free[w.worker_id] > free[best.worker_id]:
                    best, best_need = w, need
            if best is None:
                break  # vLLM v1: the first waiting request that does not fit stops the round
            free[best.worker_id] -= best_need
            held[best.worker_id] += 1
            dispatches.append(
                Dispatch(
                    req.request_id,
                    best.worker_id,
                    Placement.all_gpu(best.geometry.num_layers),
                    headroom_tokens=0,
                    preemption=PreemptionMode.RECOMPUTE,
                )
            )
        return dispatches

