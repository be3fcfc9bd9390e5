"""Typed values exchanged with workers: their event stream, decoded once at the edge, and dispatches.

``scheduler_svc/wire.py`` turns each ``StreamEventsResponse`` into a ``WorkerEvent`` (placements
as ``Placement``, step kinds as ``StepKind``) and a ``DispatchCommand`` into its request; the
scheduler's mechanism only ever sees these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from common.types import FinishReason, Placement, SamplingParams
from scheduler_svc.ledger import TierReport


class StepKind(enum.Enum):
    """What one engine step did (``mixed``: prefill chunks and decodes in one batch)."""

    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"
    UNKNOWN = "unknown"  # a kind this build does not know (a newer worker)


@dataclass(frozen=True)
class StepInfo:
    """Timing and traffic of one engine step (fitted into the cost model)."""

    kind: StepKind
    duration_s: float
    num_tokens: int
    bytes_offloaded: int
    bytes_loaded: int
    copy_wait_s: float


@dataclass(frozen=True)
class RunningReport:
    """One request a worker runs, as of its latest event."""

    worker_request_id: str
    placement: Placement
    decode_time_s: float
    context_tokens: int


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

    tokens: tuple[TokenUpdate, ...]
    running: tuple[RunningReport, ...]
    gpu: TierReport | None
    host: TierReport | None
    admitted: tuple[str, ...]
    step: StepInfo | None


@dataclass(frozen=True)
class DispatchCommand:
    """One attempt of a request, sent to one worker."""

    worker_request_id: str  # ``<id>@<attempt>``
    prompt_ids: tuple[int, ...]  # the prompt plus every token already streamed
    sampling: SamplingParams
    max_tokens: int  # what is left of the request's max_tokens
    placement: str  # layer letters, "" for the worker's default
