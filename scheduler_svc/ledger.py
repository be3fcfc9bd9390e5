"""The per-worker, per-layer budget ledger: block counts the scheduler may still hand out.

The worker owns the block ids; the scheduler only counts, with ``common.kv_budget``. A worker's
committed blocks are three terms: the blocks in use as its latest step report said, the blocks
promised but not in that report yet (a dispatch's prompt until the worker confirms it, and a
request preempted by recompute, which will take its context again, in its dispatched placement,
when the worker re-admits it),
and the growth headroom each policy asked for (``Dispatch.headroom_tokens``: 0 for vLLM's rule,
up to max_tokens for the whole-request reservation of ``fcfs-full``). Reports move each request
between these states; a finish, an abort, a refusal or a lost worker drops it. "No room" is a
``None`` return, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from common import kv_budget
from common.errors import InvalidArgument
from common.kv_budget import BlockDemand
from common.types import KVGeometry, Placement, Tier, TierCapacity
from scheduler_svc.worker_events import TierReport, WorkerEvent

__all__ = ["HoldState", "Holding", "Ledger", "Reservation", "TierReport", "WorkerBudget"]


class HoldState(Enum):
    """Where a request's blocks are counted."""

    RESERVED = "reserved"  # dispatched, not confirmed: its prompt blocks are not in any report yet
    HELD = "held"  # the worker holds its blocks: the report counts them
    WAITING = "waiting"  # preempted by recompute: no blocks now, its context again on re-admission


@dataclass
class Holding:
    """One request the ledger counts on a worker."""

    request_id: str  # the worker-side id
    placement: Placement  # current placement (swap-layers preemption moves layers to the host)
    context_tokens: int  # prompt plus tokens generated: what a (re-)prefill stores
    end_tokens: int  # context at dispatch plus max_tokens: it never grows past this
    headroom_tokens: int  # growth kept free ahead of the KV it holds (the policy's decision)
    state: HoldState = HoldState.RESERVED
    kv_tokens: int = 0  # tokens whose KV it holds: the newest sampled token is stored next step
    dispatched_placement: Placement | None = None  # what a recompute re-admission uses again

    def __post_init__(self) -> None:
        if self.dispatched_placement is None:
            self.dispatched_placement = self.placement

    def pending(self, geometry: KVGeometry) -> BlockDemand:
        """Blocks promised to it that the worker's report does not count."""
        if self.state is HoldState.HELD:
            return BlockDemand.zero(geometry.num_layers)
        return kv_budget.demand(geometry, self.context_tokens, self.placement)

    def headroom(self, geometry: KVGeometry) -> BlockDemand:
        held = self.context_tokens if self.state is not HoldState.HELD else self.kv_tokens
        return kv_budget.headroom(geometry, held, self.headroom_tokens, self.end_tokens, self.placement)


@dataclass(frozen=True)
class Reservation:
    """What one dispatch took from the budget: its prompt's blocks plus its growth headroom."""

    request_id: str  # the worker-side id of the dispatch
    prompt: BlockDemand
    headroom: BlockDemand

    @property
    def total(self) -> BlockDemand:
        return self.prompt + self.headroom

    @property
    def gpu_blocks(self) -> int:
        return self.total.gpu_blocks

    @property
    def host_blocks(self) -> int:
        return self.total.host_blocks

    @property
    def gpu_per_layer(self) -> tuple[int, ...]:
        return self.total.gpu_per_layer

    @property
    def host_per_layer(self) -> tuple[int, ...]:
        return self.total.host_per_layer


@dataclass
class WorkerBudget:
    """The ledger of one worker."""

    worker_id: str
    geometry: KVGeometry
    capacity: TierCapacity
    gpu: TierReport
    host: TierReport
    staging_blocks: int = 0  # 0: not reported, not checked
    holdings: dict[str, Holding] = field(default_factory=dict)
    preemptions: int = 0  # requests the worker reported preempted, since it came up
    swapped_layers: int = 0
    # (pending, headroom) summed over the holdings, until they change: a round reads the free
    # counts once per proposal and per worker, and re-summing every holding each time made a round
    # quadratic in the requests a worker holds.
    _totals: tuple[BlockDemand, BlockDemand] | None = field(default=None, repr=False, compare=False)

    def changed(self) -> None:
        """The holdings changed (added, dropped, or moved state): sum them again when next read."""
        self._totals = None

    def _sums(self) -> tuple[BlockDemand, BlockDemand]:
        if self._totals is None:
            pending = headroom = BlockDemand.zero(self.geometry.num_layers)
            for h in self.holdings.values():
                pending = pending + h.pending(self.geometry)
                headroom = headroom + h.headroom(self.geometry)
            self._totals = (pending, headroom)
        return self._totals

    @property
    def pending(self) -> BlockDemand:
        """Blocks promised but not in the report: unconfirmed dispatches and preempted requests."""
        return self._sums()[0]

    @property
    def headroom(self) -> BlockDemand:
        """Growth headroom the policies asked for, beyond the blocks in use."""
        return self._sums()[1]

    @property
    def gpu_reserved(self) -> int:
        return self.pending.gpu_blocks

    @property
    def host_reserved(self) -> int:
        return self.pending.host_blocks

    @property
    def gpu_free(self) -> int:
        return max(0, self.gpu.free_blocks - self.gpu_reserved - self.headroom.gpu_blocks)

    @property
    def host_free(self) -> int:
        return max(0, self.host.free_blocks - self.host_reserved - self.headroom.host_blocks)

    @property
    def num_requests(self) -> int:
        """Requests the worker holds or will hold (running, preempted, dispatched)."""
        return len(self.holdings)

    @property
    def num_preempted(self) -> int:
        """Requests preempted by recompute, waiting on the worker to be re-admitted first."""
        return sum(1 for h in self.holdings.values() if h.state is HoldState.WAITING)

    def committed_per_layer(self, tier: Tier) -> tuple[int, ...]:
        """Blocks in use plus promised plus headroom, per layer, in ``tier``."""
        report = self.gpu if tier is Tier.GPU else self.host
        used = report.used_per_layer or (0,) * self.geometry.num_layers
        extra = self.pending + self.headroom
        per_layer = extra.gpu_per_layer if tier is Tier.GPU else extra.host_per_layer
        return tuple(a + b for a, b in zip(used, per_layer, strict=True))


def _empty(total: int, layers: int) -> TierReport:
    return TierReport(total, total, (0,) * layers)


class Ledger:
    """Budgets of every known worker."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerBudget] = {}

    def add_worker(
        self, worker_id: str, geometry: KVGeometry, capacity: TierCapacity, staging_blocks: int = 0
    ) -> None:
        """(Re)start a worker's ledger as empty: its first report replaces the guess."""
        layers = geometry.num_layers
        self._workers[worker_id] = WorkerBudget(
            worker_id,
            geometry,
            capacity,
            _empty(capacity.gpu_blocks, layers),
            _empty(capacity.host_blocks, layers),
            staging_blocks,
        )

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def get(self, worker_id: str) -> WorkerBudget | None:
        return self._workers.get(worker_id)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._workers

    def try_reserve(
        self,
        worker_id: str,
        request_id: str,
        num_tokens: int,
        placement: Placement,
        *,
        max_tokens: int = 0,
        headroom_tokens: int = 0,
    ) -> Reservation | None:
        """Reserve one dispatch: ``num_tokens`` (its prompt) now, plus ``headroom_tokens`` of growth.

        ``None`` when the worker has no room in either tier or in its staging pool (or is unknown).
        """
        budget = self._workers.get(worker_id)
        if budget is None or placement.num_layers != budget.geometry.num_layers:
            return None
        if num_tokens < 1 or max_tokens < 0 or headroom_tokens < 0:
            raise InvalidArgument(
                f"reservation of {request_id}: tokens {num_tokens}, max_tokens {max_tokens}, "
                f"headroom {headroom_tokens} must be positive, non-negative, non-negative"
            )
        assert request_id not in budget.holdings, f"{request_id} reserved twice on {worker_id}"
        holding = Holding(
            request_id, placement, num_tokens, num_tokens + max_tokens, headroom_tokens, kv_tokens=num_tokens
        )
        reservation = Reservation(
            request_id, holding.pending(budget.geometry), holding.headroom(budget.geometry)
        )
        need = reservation.total
        if need.gpu_blocks > budget.gpu_free or need.host_blocks > budget.host_free:
            return None
        if budget.staging_blocks > 0 and need.host_blocks > 0:
            host = budget.committed_per_layer(Tier.HOST)
            with_new = tuple(a + b for a, b in zip(host, need.host_per_layer, strict=True))
            if not kv_budget.staging_fits(with_new, budget.staging_blocks):
                return None
        budget.holdings[request_id] = holding
        budget.changed()
        return reservation

    def release(self, worker_id: str, request_id: str) -> bool:
        """Stop counting a request: it finished, was aborted or refused (its blocks are free)."""
        budget = self._workers.get(worker_id)
        if budget is None or budget.holdings.pop(request_id, None) is None:
            return False
        budget.changed()
        return True

    def apply_report(self, worker_id: str, report: WorkerEvent) -> None:
        """One worker event: usage replaced, requests moved between reserved, held and waiting.

        A dispatch is confirmed when the worker lists it as admitted, running or waiting; from then
        on the same report's usage counts its blocks (unless it waits, preempted, holding none).
        Running requests update their context (growth) and placement (swapped layers).
        """
        budget = self._workers.get(worker_id)
        if budget is None:
            return
        for request_id in report.finished:
            budget.holdings.pop(request_id, None)
        running = {r.worker_request_id: r for r in report.running}
        waiting = set(report.waiting)
        admitted = set(report.admitted)
        layers = budget.geometry.num_layers
        for request_id, h in budget.holdings.items():
            seen = running.get(request_id)
            if h.state is HoldState.RESERVED and not (
                request_id in admitted or seen is not None or request_id in waiting
            ):
                continue  # the dispatch is still in flight: this report predates it
            state = HoldState.WAITING if request_id in waiting else HoldState.HELD
            if state is HoldState.HELD and h.state is not HoldState.HELD:
                h.kv_tokens = h.context_tokens  # (re-)admitted: the prefill stores its whole context
            if state is HoldState.WAITING and h.dispatched_placement is not None:
                h.placement = h.dispatched_placement  # re-admitted as dispatched, swapped layers undone
            h.state = state
            if seen is not None:
                h.context_tokens = max(h.context_tokens, seen.context_tokens)
                # the token sampled last is stored by the next step: the KV holds one fewer
                stored = seen.context_tokens - 1 if seen.tokens_generated else seen.context_tokens
                h.kv_tokens = max(h.kv_tokens, stored)
                if seen.placement.num_layers == layers:
                    h.placement = seen.placement
        budget.changed()
        if report.gpu is not None:
            budget.gpu = report.gpu
        if report.host is not None:
            budget.host = report.host
        if report.step is not None:
            budget.preemptions += report.step.num_preemptions
            budget.swapped_layers += report.step.num_swapped_layers

    def workers(self) -> list[WorkerBudget]:
        return list(self._workers.values())
