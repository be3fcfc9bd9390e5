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

    def per_layer(self, geometry: KVGeometry) -> tuple[int, int]:
        """(pending, headroom) blocks in each layer of its placement: both demands are uniform over
        the layers of a tier, so a worker sums two integers per holding instead of two tuples."""
        held = self.context_tokens if self.state is not HoldState.HELD else self.kv_tokens
        held_now = self.state is HoldState.HELD
        pending = 0 if held_now else kv_budget.blocks_per_layer(geometry, self.context_tokens)
        target = max(held, min(held + max(0, self.headroom_tokens), self.end_tokens))
        return pending, kv_budget.growth_per_layer(geometry, held, target)


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
    holdings: dict[str, Holding] = field(default_factory=dict)  # change only through the methods
    preemptions: int = 0  # requests the worker reported preempted, since it came up
    swapped_layers: int = 0
    # Kept incrementally, per placement: each holding's (pending, headroom) blocks per layer, and
    # their sums. A round reads the free counts per proposal and per worker, and each dispatch
    # changes the holdings: re-summing every holding on a change made a round quadratic in the
    # requests a worker holds (68 % of the scheduler's time in a burst).
    # request id -> (placement, pending, headroom, waiting) as counted
    _parts: dict[str, tuple[Placement, int, int, bool]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # placement -> [pending, headroom, holdings counted]
    _by_placement: dict[Placement, list[int]] = field(default_factory=dict, repr=False, compare=False)
    _waiting: int = field(default=0, repr=False, compare=False)
    _totals: tuple[BlockDemand, BlockDemand] | None = field(default=None, repr=False, compare=False)

    def hold(self, holding: Holding) -> None:
        """Count a new holding."""
        assert holding.request_id not in self.holdings, f"{holding.request_id} held twice"
        self.holdings[holding.request_id] = holding
        self._count(holding)

    def drop(self, request_id: str) -> Holding | None:
        """Stop counting a holding; the one dropped, or None when it was not counted."""
        holding = self.holdings.pop(request_id, None)
        if holding is not None:
            self._uncount(request_id)
        return holding

    def recount(self, holding: Holding) -> None:
        """``holding`` changed (state, context, placement): count its new demand instead of the old."""
        old = self._parts.get(holding.request_id)
        pending, headroom = holding.per_layer(self.geometry)
        waiting = holding.state is HoldState.WAITING
        if old is not None and old == (holding.placement, pending, headroom, waiting):
            return  # the common decode step: still inside the same blocks
        if old is not None:
            self._uncount(holding.request_id)
        self._count(holding, pending, headroom)

    def _count(self, holding: Holding, pending: int | None = None, headroom: int = 0) -> None:
        if pending is None:
            pending, headroom = holding.per_layer(self.geometry)
        waiting = holding.state is HoldState.WAITING
        self._parts[holding.request_id] = (holding.placement, pending, headroom, waiting)
        sums = self._by_placement.setdefault(holding.placement, [0, 0, 0])
        sums[0] += pending
        sums[1] += headroom
        sums[2] += 1
        self._waiting += waiting
        if pending or headroom:
            self._totals = None

    def _uncount(self, request_id: str) -> None:
        placement, pending, headroom, waiting = self._parts.pop(request_id)
        sums = self._by_placement[placement]
        sums[0] -= pending
        sums[1] -= headroom
        sums[2] -= 1
        if not sums[2]:
            del self._by_placement[placement]
        self._waiting -= waiting
        if pending or headroom:
            self._totals = None

    def _sums(self) -> tuple[BlockDemand, BlockDemand]:
        if self._totals is None:
            layers = self.geometry.num_layers
            pend_gpu, pend_host, head_gpu, head_host = [0] * layers, [0] * layers, [0] * layers, [0] * layers
            for placement, (pending, headroom, _) in self._by_placement.items():
                for layer, tier in enumerate(placement.tiers):
                    if tier is Tier.GPU:
                        pend_gpu[layer] += pending
                        head_gpu[layer] += headroom
                    else:
                        pend_host[layer] += pending
                        head_host[layer] += headroom
            self._totals = (
                BlockDemand(tuple(pend_gpu), tuple(pend_host)),
                BlockDemand(tuple(head_gpu), tuple(head_host)),
            )
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

    def _promised(self) -> tuple[int, int]:
        """Promised plus headroom blocks over all layers, (GPU, host): from the per-placement sums,
        two integers per placement, not the per-layer tuples of ``pending`` / ``headroom``, which
        every hold invalidates (admission asks for the free blocks after each dispatch's hold)."""
        gpu = host = 0
        for placement, (pending, headroom, _) in self._by_placement.items():
            on_gpu = placement.tiers.count(Tier.GPU)
            gpu += (pending + headroom) * on_gpu
            host += (pending + headroom) * (len(placement.tiers) - on_gpu)
        return gpu, host

    @property
    def gpu_free(self) -> int:
        return max(0, self.gpu.free_blocks - self._promised()[0])

    @property
    def host_free(self) -> int:
        return max(0, self.host.free_blocks - self._promised()[1])

    @property
    def num_requests(self) -> int:
        """Requests the worker holds or will hold (running, preempted, dispatched)."""
        return len(self.holdings)

    @property
    def num_preempted(self) -> int:
        """Requests preempted by recompute, waiting on the worker to be re-admitted first."""
        return self._waiting

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
        budget.hold(holding)
        return reservation

    def release(self, worker_id: str, request_id: str) -> bool:
        """Stop counting a request: it finished, was aborted or refused (its blocks are free)."""
        budget = self._workers.get(worker_id)
        return budget is not None and budget.drop(request_id) is not None

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
            budget.drop(request_id)
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
            budget.recount(h)
        if report.gpu is not None:
            budget.gpu = report.gpu
        if report.host is not None:
            budget.host = report.host
        if report.step is not None:
            budget.preemptions += report.step.num_preemptions
            budget.swapped_layers += report.step.num_swapped_layers

    def workers(self) -> list[WorkerBudget]:
        return list(self._workers.values())
