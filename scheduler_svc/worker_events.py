"""Typed values exchanged with workers: their description, their event stream, and dispatches.

``scheduler_svc/wire.py`` turns a ``DescribeResponse`` into a ``WorkerDescription``, each
``StreamEventsResponse`` into a ``WorkerEvent`` (placements as ``Placement``, step kinds as
``StepKind``), a ``DispatchCommand`` into its request and each ``DispatchBatch`` result into its
typed outcome (None, or one of the ``Dispatch*`` errors); the scheduler's mechanism (pool, intake,
ledger, metrics, cost fit) only ever sees these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common.cost_profile import ProfileInfo
from common.errors import LayerKVError
from common.types import CostModel, FinishReason, KVGeometry, Placement, SamplingParams, TierCapacity
from scheduler_svc.policies.base import PreemptionMode


@dataclass(frozen=True)
class WorkerDescription:
    """What a worker said about itself on connect (``Describe``)."""

    worker_id: str
    model: str
    geometry: KVGeometry
    capacity: TierCapacity
    cost_model: CostModel
    max_model_len: int
    eos_token_id: int
    staging_blocks: int = 0  # GPU staging blocks for host-placed layers (0: not reported)
    preemption_mode: str = ""  # the worker's default when a request cannot grow ("": not reported)
    max_num_batched_tokens: int = 0  # per-step token budget of chunked prefill (0: not reported)
    vocab_size: int = 0  # token ids a prompt may use are [0, vocab_size) (0: not reported)
    profile: ProfileInfo = field(default_factory=ProfileInfo)  # how cost_model was obtained


class StepKind(enum.Enum):
    """What one engine step computed."""

    IDLE = "idle"  # a state-only event (heartbeat, admission report): no compute
    PREFILL = "prefill"  # prompt chunks only
    DECODE = "decode"  # decodes only
    MIXED = "mixed"  # prompt chunks and decodes in one batch (chunked prefill)
    UNKNOWN = "unknown"  # a kind this build does not know (a newer worker): nothing to fit


@dataclass(frozen=True)
class TierReport:
    """One tier as a worker reported it after a step."""

    total_blocks: int
    free_blocks: int
    used_per_layer: tuple[int, ...]


@dataclass(frozen=True)
class StepInfo:
    """Timing and traffic of one engine step (``StepReport``; fitted into the cost model)."""

    step: int
    kind: StepKind
    duration_s: float
    num_tokens: int  # prompt tokens of a prefill step, requests of a decode step
    bytes_offloaded: int = 0
    bytes_loaded: int = 0
    copy_wait_s: float = 0.0
    num_prefill_tokens: int = 0  # prompt tokens (chunks) computed in the step
    num_decode_requests: int = 0
    num_preemptions: int = 0  # requests preempted in the step (recompute or swap-layers)
    num_swapped_layers: int = 0  # layers moved GPU -> host by swap-layers preemption


@dataclass(frozen=True)
class RunningReport:
    """One request a worker runs (it holds blocks), as of its latest event."""

    worker_request_id: str
    placement: Placement  # where its layers live now (swap-layers changes it)
    decode_time_s: float  # T_past
    context_tokens: int  # prompt plus tokens generated
    tokens_generated: int = 0  # N_past


@dataclass(frozen=True)
class TokenUpdate:
    """New tokens of one worker-side request, and its end."""

    worker_request_id: str
    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None  # None while not finished
    error: str = ""


@dataclass(frozen=True)
class WorkerEvent:
    """One StreamEvents message."""

    tokens: tuple[TokenUpdate, ...] = ()
    running: tuple[RunningReport, ...] = ()
    gpu: TierReport | None = None
    host: TierReport | None = None
    admitted: tuple[str, ...] = ()  # dispatches the worker took since its last event
    step: StepInfo | None = None
    waiting: tuple[str, ...] = ()  # held without blocks: preempted by recompute, to be re-prefilled
    preempted: tuple[str, ...] = ()  # preempted by recompute in this step (also in ``waiting``)

    @property
    def finished(self) -> tuple[str, ...]:
        """Requests that ended in this event (their blocks are free)."""
        return tuple(u.worker_request_id for u in self.tokens if u.finished)


@dataclass(frozen=True)
class DispatchCommand:
    """One attempt of a request, sent to one worker."""

    worker_request_id: str  # ``<id>@<attempt>``
    prompt_ids: tuple[int, ...]  # the prompt plus every token already streamed
    sampling: SamplingParams
    max_tokens: int  # what is left of the request's max_tokens
    placement: str  # layer letters, "" for the worker's default
    preemption: PreemptionMode = PreemptionMode.WORKER_DEFAULT


class DispatchRefused(LayerKVError):
    """The worker has no room now (it did not take the request)."""


class DispatchRejected(LayerKVError):
    """The worker rejected the request as invalid (it never will take it)."""


class DispatchUnsent(LayerKVError):
    """The dispatch never reached the worker (no connection)."""


class DispatchOutcomeUnknown(LayerKVError):
    """The call failed after it was sent: the worker may have taken the request."""
