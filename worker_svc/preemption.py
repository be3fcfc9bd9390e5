"""Preemption when a request's KV growth finds no room, in the victim's own mode.

Victims are taken among the requests not yet scheduled in this step (the one asking included),
newest admission first (vLLM v1's rule). ``swap-layers`` (LayerKV's own) moves GPU layers of the
newest such request in that mode that still has any to the host tier, one at a time, as few as the
growth needs; the request keeps decoding with those layers streamed in through staging. When
swapping cannot help (no host blocks, the staging rule, or the shortfall is not GPU blocks) the
newest request is preempted by ``recompute``: all its blocks are freed and it goes to the front of
the waiting queue, keeping its output and its sampling generator, to be re-prefilled from
prompt + output later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.types import FinishReason, Tier
from worker_svc.kv.step_access import CopyStats
from worker_svc.outputs import RequestOutput
from worker_svc.request import Request, RequestState

if TYPE_CHECKING:
    from worker_svc.engine import Engine


@dataclass
class StepCounts:
    """Preemptions of one step."""

    preemptions: int = 0  # requests preempted, each counted once per step whatever its mode
    swapped_layers: int = 0
    preempted: list[str] = field(default_factory=list)  # by recompute, in order
    _victims: set[str] = field(default_factory=set)

    def count(self, request_id: str) -> None:
        if request_id not in self._victims:
            self._victims.add(request_id)
            self.preemptions += 1


@dataclass(frozen=True)
class Unscheduled:
    """The request that asked for room is not scheduled: preempted itself, or failed (``error``)."""

    error: RequestOutput | None = None


class Preemptor:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def make_room(self, req: Request, to_tokens: int, stats: CopyStats,
                  counts: StepCounts) -> Unscheduled | None:
        """Grow ``req`` to hold ``to_tokens`` tokens, preempting newer requests as needed.

        ``None`` when it grew; otherwise why ``req`` is not scheduled in this step.
        """
        engine, mgr = self.engine, self.engine.kv_manager
        assert req.table is not None
        while not mgr.grow(req.table, to_tokens):
            short = mgr.growth_shortfall(req.table, to_tokens)
            if short is Tier.GPU and self._swap(req, to_tokens, stats, counts):
                continue
            victim = engine._running[-1]
            if len(engine._running) == 1:  # alone and still no room: no preemption can ever help
                held = req.table.blocks_per_layer
                engine._finish(req, FinishReason.ERROR)
                return Unscheduled(RequestOutput(
                    req.request_id, (), (), True, FinishReason.ERROR,
                    error=(f"the KV cache cannot hold {to_tokens} tokens of request {req.request_id!r} even "
                           f"with no other request (it holds {held} blocks per layer; short of "
                           f"{short.value if isinstance(short, Tier) else short} blocks)")))
            self._recompute(victim, counts)
            if victim is req:
                return Unscheduled()
        return None

    def _swap(self, req: Request, to_tokens: int, stats: CopyStats, counts: StepCounts) -> bool:
        """Move one GPU layer of the newest unscheduled swap-layers request to the host tier;
        ``False`` when swapping every layer it could would still not make room."""
        engine, mgr = self.engine, self.engine.kv_manager
        assert req.table is not None
        unscheduled = engine._running[engine._running.index(req):]
        options = []  # (victim, its table, layers it could swap), newest first
        for v in reversed(unscheduled):
            if v.preemption == "swap-layers" and v.table is not None:
                layers = mgr.swap_candidates(v.table)
                if layers:
                    options.append((v, v.table, layers))
        if not options:
            return False
        short = mgr.growth_demand(req.table, to_tokens).gpu_blocks - mgr.gpu.num_free
        # Swapping a layer of ``req`` itself also moves its growth there off the GPU tier.
        freed = sum(len(layers) * table.blocks_per_layer for _, table, layers in options)
        if freed < short and all(v is not req for v, _, _ in options):
            return False
        victim, table, layers = options[0]
        moved = mgr.swap_out(table, layers[0], engine.copy_engine, engine.kv.gpu, engine.kv.host)
        stats.offloaded(victim.request_id, moved)
        counts.count(victim.request_id)
        counts.swapped_layers += 1
        return True

    def _recompute(self, victim: Request, counts: StepCounts) -> None:
        """Drop ``victim``'s blocks and requeue it first; its output and generator stay."""
        engine = self.engine
        engine.kv_manager.release(victim.request_id)
        engine._running.remove(victim)
        victim.table, victim.state, victim.num_computed = None, RequestState.WAITING, 0
        victim.num_preemptions += 1
        engine._waiting.appendleft(victim)
        counts.count(victim.request_id)
        counts.preempted.append(victim.request_id)
