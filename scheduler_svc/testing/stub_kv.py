"""The stub worker's KV blocks: on-demand growth and preemption, counted with ``common.kv_budget``.

Requests hold the blocks of the tokens whose KV they store, in the tiers their placement names; a
step grows each one a block per layer at each block boundary. When growth does not fit, the newest
running request is preempted, as vLLM v1 does: by recompute (its blocks freed; it waits, ahead of
new dispatches, to be re-prefilled from its whole context in its dispatched placement) or, when its
dispatch asked for ``swap-layers``, by moving its GPU layers to the host tier one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common import kv_budget
from common.kv_budget import BlockDemand
from common.types import KVGeometry, Placement


@dataclass
class StubRequest:
    """One request on the stub worker."""

    request_id: str
    context: list[int]  # prompt plus tokens generated
    max_tokens: int
    stop_ids: frozenset[int]
    placement: Placement  # current: swap-layers moves GPU layers to the host
    preemption: str  # "recompute" or "swap-layers"
    order: int  # admission order: the newest running request is preempted first
    held_tokens: int = 0  # tokens whose KV blocks it holds (0 while preempted)
    generated: int = 0
    decode_time_s: float = 0.0
    dispatched_placement: Placement | None = None  # a recompute re-admits it with this again
    # The last ``blocks`` answer and what it was computed from: a step sums every running
    # request's blocks, and most of them did not change since the last sum.
    _blocks: tuple[int, Placement, KVGeometry, BlockDemand] | None = field(
        default=None, repr=False, compare=False
    )

    def blocks(self, geometry: KVGeometry) -> BlockDemand:
        known = self._blocks
        if known is not None and known[0] == self.held_tokens and known[1] is self.placement and (
            known[2] is geometry
        ):
            return known[3]
        demand = kv_budget.demand(geometry, self.held_tokens, self.placement)
        self._blocks = (self.held_tokens, self.placement, geometry, demand)
        return demand


@dataclass
class StepCounts:
    """What one step did to the blocks (reported in ``StepReport``)."""

    prefill_tokens: int = 0
    preemptions: int = 0
    swapped_layers: int = 0
    preempted: list[str] = field(default_factory=list)  # by recompute, this step


@dataclass
class StubKV:
    """Running requests (holding blocks) and preempted ones (holding none) of one stub worker."""

    geometry: KVGeometry
    gpu_blocks: int
    host_blocks: int
    running: dict[str, StubRequest] = field(default_factory=dict)  # in admission order
    waiting: list[StubRequest] = field(default_factory=list)  # preempted, in admission order
    preempted: list[str] = field(default_factory=list)  # every preemption, in order (ids repeat)

    def used(self) -> BlockDemand:
        """Blocks held per tier and layer: the sum over running requests."""
        layers = self.geometry.num_layers
        gpu, host = [0] * layers, [0] * layers
        for r in self.running.values():
            d = r.blocks(self.geometry)
            for i, (g, h) in enumerate(zip(d.gpu_per_layer, d.host_per_layer, strict=True)):
                gpu[i] += g
                host[i] += h
        return BlockDemand(tuple(gpu), tuple(host))

    @property
    def gpu_free(self) -> int:
        return self.gpu_blocks - self.used().gpu_blocks

    @property
    def host_free(self) -> int:
        return self.host_blocks - self.used().host_blocks

    def fits(self, extra: BlockDemand) -> bool:
        used = self.used()  # once: it sums over every running request
        return extra.gpu_blocks <= self.gpu_blocks - used.gpu_blocks and (
            extra.host_blocks <= self.host_blocks - used.host_blocks
        )

    def holds(self, request_id: str) -> bool:
        return request_id in self.running or any(r.request_id == request_id for r in self.waiting)

    def remove(self, request_id: str) -> bool:
        """Drop a request (aborted), running or preempted; False when it is not here."""
        if self.running.pop(request_id, None) is not None:
            return True
        before = len(self.waiting)
        self.waiting = [r for r in self.waiting if r.request_id != request_id]
        return len(self.waiting) < before

    def readmit(self, counts: StepCounts) -> None:
        """Re-admit preempted requests, oldest first, while their whole context fits again."""
        while self.waiting:
            r = self.waiting[0]
            if not self.fits(kv_budget.demand(self.geometry, len(r.context), r.placement)):
                break
            self.waiting.pop(0)
            r.held_tokens = len(r.context)
            self.running[r.request_id] = r
            counts.prefill_tokens += len(r.context)

    def grow(self, r: StubRequest, counts: StepCounts) -> bool:
        """Blocks for the token this step stores; preempts the newest (maybe ``r``) while short."""
        while True:
            need = kv_budget.growth(self.geometry, r.held_tokens, len(r.context), r.placement)
            # A token inside its last block needs nothing, and what is held always fits (every
            # block was taken through ``fits``): no sum over the running requests then. With it,
            # each step was quadratic in them (the overhead benchmark's direct burst, 256 running,
            # was bound by it).
            if (not need.gpu_blocks and not need.host_blocks) or self.fits(need):
                r.held_tokens = len(r.context)
                return True
            victim = max(self.running.values(), key=lambda v: v.order)  # the newest, as vLLM v1
            self._preempt(victim, counts, need)
            if r.request_id not in self.running:
                return False

    def _preempt(self, victim: StubRequest, counts: StepCounts, need: BlockDemand) -> None:
        counts.preemptions += 1
        self.preempted.append(victim.request_id)
        if victim.preemption == "swap-layers" and self._swap_out(victim, need, counts):
            return  # it keeps decoding with host layers
        del self.running[victim.request_id]  # recompute: free everything, wait ahead of new dispatches
        victim.held_tokens = 0
        victim.placement = victim.dispatched_placement or victim.placement
        self.waiting.append(victim)
        self.waiting.sort(key=lambda w: w.order)
        counts.preempted.append(victim.request_id)

    def _swap_out(self, victim: StubRequest, need: BlockDemand, counts: StepCounts) -> bool:
        """Move the victim's GPU layers to the host, last first, until ``need`` fits the GPU."""
        per_layer = kv_budget.blocks_per_layer(self.geometry, victim.held_tokens)
        letters = list(victim.placement.letters)
        moved = 0
        for layer in reversed(range(len(letters))):
            if need.gpu_blocks <= self.gpu_free:
                break
            if letters[layer] != "G" or self.host_free < per_layer + need.host_blocks:
                continue
            letters[layer] = "H"
            victim.placement = Placement.from_letters("".join(letters), self.geometry.num_layers)
            moved += 1
        counts.swapped_layers += moved
        return moved > 0
