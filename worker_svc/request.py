"""A request inside the engine: its prompt, sampling, generated tokens, blocks and timings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from common.types import FinishReason, Placement, SamplingParams
from worker_svc.kv.block_table import LayerBlockTable


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, no blocks yet
    ADMITTED = "admitted"  # blocks reserved, prompt not yet computed
    RUNNING = "running"  # prefilled, decoding
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    placement: Placement | None  # asked-for placement; None: the engine's default
    generator: torch.Generator
    arrival_s: float
    eos_token_id: int | None
    state: RequestState = RequestState.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    table: LayerBlockTable | None = None
    first_token_s: float | None = None
    decode_time_s: float = 0.0
    finish_reason: FinishReason | None = None
    admitted_placement: str = ""  # placement letters at admission

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.sampling.max_tokens

    @property
    def context_tokens(self) -> int:
        """Tokens whose K/V are (or are about to be) cached: the prompt plus all but the last output."""
        return len(self.prompt_ids) + max(0, len(self.output_ids) - 1)

    def append(self, token_id: int, logprob: float) -> FinishReason | None:
        """Record a sampled token; the finish reason if it ends the request."""
        self.output_ids.append(token_id)
        self.logprobs.append(logprob)
        s = self.sampling
        if token_id in s.stop_token_ids or (
            not s.ignore_eos and self.eos_token_id is not None and token_id == self.eos_token_id
        ):
            return FinishReason.STOP
        if len(self.output_ids) >= s.max_tokens:
            return FinishReason.LENGTH
        return None
