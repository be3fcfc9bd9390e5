"""The per-worker, per-layer budget ledger: block counts the scheduler may still hand out.

The worker owns the block ids; the scheduler only counts. A worker's free blocks are what its
latest step report said, minus the reservations it has not confirmed yet (a dispatch reserves,
the worker's ``admitted_request_ids`` confirm — from then on the report itself counts the blocks —
and a refusal, an abort before admission, or a lost worker releases). A request reserves, in every
layer, the blocks for its prompt plus ``max_tokens`` in the tier its placement names, exactly as
the engine admits it. "No room" is a ``None`` return, never an exception.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from common.types import KVGeometry, Placement, Tier, TierCapacity


@dataclass(frozen=True)
class Reservation:
    """Blocks held for one dispatch until the worker confirms it."""

    request_id: str  # the worker-side id of the dispatch
    gpu_blocks: int
    host_blocks: int
    gpu_per_layer: tuple[int, ...]  # blocks per layer in the GPU tier
    host_per_layer: tuple[int, ...]


@dataclass(frozen=True)
class TierReport:
    """One tier as a worker reported it after a step."""

    total_blocks: int
    free_blocks: int
    used_per_layer: tuple[int, ...]


@dataclass
class WorkerBudget:
    """The ledger of one worker."""

    worker_id: str
    geometry: KVGeometry
    capacity: TierCapacity
    gpu: TierReport
    host: TierReport
    reservations: dict[str, Reservation] = field(default_factory=dict)

    @property
    def gpu_reserved(self) -> int:
        return sum(r.gpu_blocks for r in self.reservations.values())

    @property
    def host_reserved(self) -> int:
        return sum(r.host_blocks for r in self.reservations.values())

    @property
    def gpu_free(self) -> int:
        return max(0, self.gpu.free_blocks - self.gpu_reserved)

    @property
    def host_free(self) -> int:
        return max(0, self.host.free_blocks - self.host_reserved)

    def committed_per_layer(self, tier: Tier) -> tuple[int, ...]:
        """Blocks in use plus reserved, per layer, in ``tier``."""
        report = self.gpu if tier is Tier.GPU else self.host
        used = list(report.used_per_layer) or [0] * self.geometry.num_layers
        for r in self.reservations.values():
            extra = r.gpu_per_layer if tier is Tier.GPU else r.host_per_layer
            for layer, n in enumerate(extra):
                used[layer] += n
        return tuple(used)


def _empty(total: int, layers: int) -> TierReport:
    return TierReport(total, total, (0,) * layers)


class Ledger:
    """Budgets of every known worker."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerBudget] = {}

    def add_worker(self, worker_id: str, geometry: KVGeometry, capacity: TierCapacity) -> None:
        """(Re)start a worker's ledger as empty: its first report replaces the guess."""
        layers = geometry.num_layers
        self._workers[worker_id] = WorkerBudget(
            worker_id,
            geometry,
            capacity,
            _empty(capacity.gpu_blocks, layers),
            _empty(capacity.host_blocks, layers),
        )

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def get(self, worker_id: str) -> WorkerBudget | None:
        return self._workers.get(worker_id)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._workers

    @staticmethod
    def need(geometry: KVGeometry, num_tokens: int, placement: Placement) -> Reservation:
        """Blocks a request of ``num_tokens`` (prompt + max output) takes under ``placement``."""
        per_layer = geometry.blocks_for(num_tokens)
        gpu = tuple(per_layer if t is Tier.GPU else 0 for t in placement.tiers)
        host = tuple(per_layer if t is Tier.HOST else 0 for t in placement.tiers)
        return Reservation("", sum(gpu), sum(host), gpu, host)

    def try_reserve(
        self, worker_id: str, request_id: str, num_tokens: int, placement: Placement
    ) -> Reservation | None:
        """Reserve the blocks of one dispatch; ``None`` when the worker has no room (or is unknown)."""
        budget = self._workers.get(worker_id)
        if budget is None or placement.num_layers != budget.geometry.num_layers:
            return None
        assert request_id not in budget.reservations, f"{request_id} reserved twice on {worker_id}"
        need = self.need(budget.geometry, num_tokens, placement)
        if need.gpu_blocks > budget.gpu_free or need.host_blocks > budget.host_free:
            return None
        reservation = Reservation(
            request_id, need.gpu_blocks, need.host_blocks, need.gpu_per_layer, need.host_per_layer
        )
        budget.reservations[request_id] = reservation
        return reservation

    def release(self, worker_id: str, request_id: str) -> bool:
        """Drop a reservation the worker will never confirm (refused, aborted before admission)."""
        budget = self._workers.get(worker_id)
        return budget is not None and budget.reservations.pop(request_id, None) is not None

    def apply_report(
        self, worker_id: str, admitted: Iterable[str], gpu: TierReport | None, host: TierReport | None
    ) -> None:
        """One step report: admitted dispatches stop being reservations, the usage is replaced.

        Both happen together because the same report's usage already counts the admitted blocks.
        """
        budget = self._workers.get(worker_id)
        if budget is None:
            return
        for request_id in admitted:
            budget.reservations.pop(request_id, None)
        if gpu is not None:
            budget.gpu = gpu
        if host is not None:
            budget.host = host

    def workers(self) -> list[WorkerBudget]:
        return list(self._workers.values())
