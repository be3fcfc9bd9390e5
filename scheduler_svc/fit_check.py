"""Whether a request could ever be held by a worker under the active policy (an empty worker, the
policy's fixed placement when it has one): what admission refuses at once, and what a policy swap
ends among the waiting requests, instead of letting them wait until their client gives up."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from common.kv_budget import never_fits
from scheduler_svc.policies.base import Policy
from scheduler_svc.worker_events import WorkerDescription


def never_fits_reason(policy: Policy, d: WorkerDescription, total: int) -> str | None:
    """Why worker ``d`` could never hold ``total`` tokens under ``policy``, or None."""
    placement = policy.reservation(d.geometry.num_layers)
    if placement is not None:
        reason = never_fits(d.geometry, total, placement, d.capacity, d.staging_blocks or 10**9)
        return f"worker {d.worker_id} {reason}" if reason else None
    need = d.geometry.blocks_for(total) * d.geometry.num_layers
    if need > d.capacity.gpu_blocks + d.capacity.host_blocks:
        return (
            f"worker {d.worker_id} needs {need} blocks for {total} tokens, "
            f"it has {d.capacity.gpu_blocks} GPU + {d.capacity.host_blocks} host"
        )
    return None


def never_fits_anywhere(policy: Policy, workers: Iterable[WorkerDescription], total: int) -> str | None:
    """The reasons joined when no worker could ever hold it (None when one could, or none is known)."""
    reasons = [never_fits_reason(policy, d, total) for d in workers]
    if not reasons or not all(reasons):
        return None
    return f"under policy {policy.name!r}: " + "; ".join(str(r) for r in reasons)


class FitCheck:
    """``never_fits_anywhere``, remembered per total while the policy and the workers'
    descriptions stay the same objects (admission asks it for every request; the answer changes
    only with a policy swap or a worker (re)connecting)."""

    def __init__(self) -> None:
        self._policy: Policy | None = None
        self._workers: tuple[WorkerDescription, ...] = ()
        self._answers: dict[int, str | None] = {}

    def __call__(self, policy: Policy, workers: Sequence[WorkerDescription], total: int) -> str | None:
        if (
            policy is not self._policy
            or len(workers) != len(self._workers)
            or any(a is not b for a, b in zip(workers, self._workers, strict=True))
        ):
            self._policy, self._workers, self._answers = policy, tuple(workers), {}
        if total not in self._answers:
            if len(self._answers) >= 4096:  # bounded: totals vary with every prompt length
                self._answers.clear()
            self._answers[total] = never_fits_anywhere(policy, workers, total)
        return self._answers[total]
