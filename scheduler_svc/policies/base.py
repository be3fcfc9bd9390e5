"""The policy interface: a pure decision over a read-only snapshot of the fleet.

A policy orders the waiting queue and proposes dispatches (request → worker, layer placement,
growth headroom, preemption mode). It owns no state that matters for correctness: the mechanism
(``scheduler_svc.ledger``) re-checks every hard limit, reserves the blocks, and simply skips a
proposal that no longer fits. The mechanism never branches on a policy's name; policies register
by name in ``registry.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from common import kv_budget
from common.types import CostModel, KVGeometry, Placement


class PreemptionMode(Enum):
    """What the worker does when a running request cannot grow (``DispatchRequest.preemption``)."""

    WORKER_DEFAULT = ""  # whatever the worker is configured with
    RECOMPUTE = "recompute"  # vLLM v1: drop the newest running request, re-prefill it later
    SWAP_LAYERS = "swap-layers"  # LayerKV: move some of its GPU layers to the host tier, keep decoding


class PolicyParams(BaseModel):
    """Base of every policy's parameters: typed, validated, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class WaitingRequest:
    """A request in the waiting queue, as a policy sees it."""

    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    arrival_time: float  # unix seconds
    ttft_slo_s: float | None  # the request's own SLO; None takes the policy default
    tpot_slo_s: float | None
    # The client's own estimate of its output length (``GenerateRequest.expected_output_tokens``);
    # None: not given, the policy predicts it.
    expected_output_tokens: int | None = None


@dataclass(frozen=True)
class RunningRequest:
    """A request running on a worker, from the worker's latest step report."""

    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    tokens_generated: int  # N_past
    decode_time_s: float  # T_past: decode time spent on it so far
    tpot_slo_s: float | None
    placement: Placement
    expected_output_tokens: int | None = None  # the client's estimate of its output length
    # When the scheduler received its first token (unix seconds; 0: not known). TPOT as a client
    # measures it runs on this clock, which also sees what the worker's step times miss (time
    # between steps, event delivery, a requeue's restart).
    first_token_time: float = 0.0


@dataclass(frozen=True)
class PrefillInFlight:
    """A request dispatched to a worker whose prefill the worker has not reported done yet.

    The worker lists a request as running only once its prefill has produced the first token, so
    until then its prefill is ahead of (or in) the worker's steps and stalls every running decode:
    a policy charges it from here (``scheduler_svc.inflight``), and from the running list's T_past
    afterwards, never both.
    """

    request_id: str
    num_prompt_tokens: int  # the context it prefills (prompt plus tokens of earlier attempts)
    max_tokens: int  # output tokens still to generate
    placement: Placement  # as dispatched
    tpot_slo_s: float | None
    dispatch_time: float  # unix seconds
    expected_output_tokens: int | None = None


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker: geometry, free budget (reservations already subtracted), load and cost model."""

    worker_id: str
    geometry: KVGeometry
    gpu_blocks_total: int
    host_blocks_total: int
    gpu_blocks_free: int  # free minus reserved-but-unconfirmed
    host_blocks_free: int
    max_model_len: int
    cost_model: CostModel
    running: tuple[RunningRequest, ...]
    accepting: bool  # healthy and not draining
    # GPU staging blocks that host-placed layers stream through (Describe.staging_blocks); the
    # worker admits a request only while, for every two adjacent layers, the host blocks of all its
    # requests fit in it. 0: unknown, not checked.
    staging_blocks_total: int = 0
    # Host blocks held or reserved per layer (the staging demand of host-placed layers); empty: unknown.
    host_used_per_layer: tuple[int, ...] = ()
    # The worker's per-step token budget shared by prefill chunks and decodes (chunked prefill);
    # 0: not reported, a prompt is prefilled in one step.
    max_num_batched_tokens: int = 0
    # Requests the worker holds or will hold: running, preempted and waiting on the worker, and
    # dispatched but not yet confirmed (from the ledger). 0: use ``len(running)``.
    requests_held: int = 0
    # Of those, requests preempted by recompute and waiting on the worker: it re-admits them ahead
    # of any new dispatch (and refuses new dispatches until then).
    requests_preempted: int = 0
    # Dispatched requests not in ``running`` yet (prefill pending or in progress), oldest first;
    # their blocks are already subtracted from the free counts above.
    prefilling: tuple[PrefillInFlight, ...] = ()


def all_gpu_blocks(worker: WorkerSnapshot, num_tokens: int) -> int:
    """GPU blocks ``num_tokens`` take on ``worker`` with every layer on the GPU (what
    ``kv_budget.demand`` counts for an all-GPU placement: the same blocks in each layer, summed
    here without building the placement and its per-layer tuples, once per request and worker per
    round)."""
    geometry = worker.geometry
    return kv_budget.blocks_per_layer(geometry, num_tokens) * geometry.num_layers


def fits_empty_gpu(worker: WorkerSnapshot, num_tokens: int) -> bool:
    """Whether an empty ``worker`` could hold ``num_tokens`` tokens all on its GPU tier (with no
    host layer, ``kv_budget.never_fits`` checks only the GPU blocks)."""
    fits_gpu = all_gpu_blocks(worker, num_tokens) <= worker.gpu_blocks_total
    return num_tokens <= worker.max_model_len and fits_gpu


@dataclass(frozen=True)
class FleetSnapshot:
    """Everything a policy may look at in one scheduling round (read-only)."""

    now: float  # unix seconds
    waiting: tuple[WaitingRequest, ...]  # in arrival order
    workers: tuple[WorkerSnapshot, ...]


@dataclass(frozen=True)
class Dispatch:
    """A policy's proposal: run this request on this worker with this placement.

    ``headroom_tokens`` is the decode growth the ledger keeps free for the request beyond the
    tokens it holds (never past prompt + max_tokens): 0 admits on the prompt alone and grows on
    demand (vLLM), ``max_tokens`` or more reserves the whole request up front (``fcfs-full``).
    ``preemption`` is what the worker does when the request must give up GPU blocks.
    """

    request_id: str
    worker_id: str
    placement: Placement
    headroom_tokens: int = 0
    preemption: PreemptionMode = PreemptionMode.WORKER_DEFAULT


class Policy(ABC):
    """A scheduling policy. Subclasses set ``name``, ``description`` and ``Params``."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[PolicyParams]] = PolicyParams
    # False for a policy that never reads ``WorkerSnapshot.cost_model``: rounds then hand it the
    # worker's profiled model instead of re-solving the online fit (a least-squares solve per
    # worker per round, and the fit changes with every decode step).
    reads_cost_model: ClassVar[bool] = True

    def __init__(self, params: PolicyParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @abstractmethod
    def schedule(self, fleet: FleetSnapshot) -> Sequence[Dispatch]:
        """Dispatches for this round, in the order the mechanism should try them.

        Each proposal must fit the snapshot's free budget *after* the proposals before it in the
        same list (the policy accounts for its own proposals); the mechanism re-checks anyway.
        """

    def reservation(self, num_layers: int) -> Placement | None:
        """The placement this policy reserves a request under on an empty worker, when it is fixed
        (admission refuses at once what could never fit it); None: it adapts the placement."""
        return None
