"""What one worker event says, as typed values: usage per tier and layer, the step, who runs.

``scheduler_svc.wire.worker_report_from_proto`` decodes a ``StreamEventsResponse`` into a
``WorkerReport``; the ledger and the metrics read only these types, never the proto.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StepKind(Enum):
    """What an engine step computed."""

    IDLE = "idle"  # a state-only event (heartbeat, admission report): no compute
    PREFILL = "prefill"  # prompt chunks only
    DECODE = "decode"  # decodes only
    MIXED = "mixed"  # prompt chunks and decodes in one batch (chunked prefill)


@dataclass(frozen=True)
class TierReport:
    """One tier as a worker reported it after a step."""

    total_blocks: int
    free_blocks: int
    used_per_layer: tuple[int, ...]


@dataclass(frozen=True)
class StepInfo:
    """One engine step (``StepReport``)."""

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
class RunningInfo:
    """A request running on the worker after the step (it holds blocks)."""

    request_id: str  # worker-side id
    tokens_generated: int
    decode_time_s: float
    context_tokens: int  # prompt plus tokens generated: what its KV holds
    placement: str  # current placement letters ("" when the worker does not say)


@dataclass(frozen=True)
class WorkerReport:
    """One ``StreamEventsResponse``, decoded."""

    admitted: tuple[str, ...] = ()  # dispatches the worker took since its last event
    finished: tuple[str, ...] = ()  # requests that ended in this event (their blocks are free)
    running: tuple[RunningInfo, ...] = ()
    waiting: tuple[str, ...] = ()  # held without blocks: preempted by recompute, to be re-prefilled
    preempted: tuple[str, ...] = ()  # preempted by recompute in this step (also in ``waiting``)
    gpu: TierReport | None = None
    host: TierReport | None = None
    step: StepInfo | None = None
