"""A request inside the engine: its prompt, sampling, generated tokens, blocks, progress and timings.

Progress is vLLM v1's: the request's sequence is prompt + output, ``num_computed`` of its tokens
have K/V in the cache, and each step computes some of the rest (a prefill chunk, or the one token
of a decode). A recompute preemption resets ``num_computed`` to 0 and keeps the output and the
sampling generator, so the re-prefill continues the stream exactly where it stopped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from common.types import FinishReason, Placement, SamplingParams
from worker_svc.kv.block_table import LayerBlockTable


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted by recompute), no blocks
    ADMITTED = "admitted"  # holds blocks, (re-)prefill not finished
    RUNNING = "running"  # prefilled, decoding
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    placement: Placement | None  # asked-for placement; None: the engine's default
    generator: torch.Generator | None  # a seed's own stream, kept across preemptions; None: unseeded
    arrival_s: float
    eos_token_id: int | None
    preemption: str = "recompute"  # how this request is preempted when growth fails (EngineConfig)
    state: RequestState = RequestState.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    table: LayerBlockTable | None = None
    num_computed: int = 0  # tokens of prompt + output whose K/V are cached
    admit_seq: int = 0  # order of the latest admission (the newest is preempted first)
    num_preemptions: int = 0
    first_token_s: float | None = None
    decode_time_s: float = 0.0
    finish_reason: FinishReason | None = None
    admitted_placement: str = ""  # placement letters at the latest admission
    bytes_offloaded: int = 0  # copies of steps that produced no token yet (reported with the next one)
    bytes_loaded: int = 0
    # The token ids that stop this request (its stop ids, and EOS unless ignored): one set lookup
    # per sampled token instead of a tuple scan and three attribute checks
    _stops: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = self.sampling
        eos = () if s.ignore_eos or self.eos_token_id is None else (self.eos_token_id,)
        self._stops = frozenset((*s.stop_token_ids, *eos))

    @property
    def num_tokens(self) -> int:
        """Length of the sequence: prompt plus every output token."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, start: int, end: int) -> list[int]:
        """Token ids of positions ``start .. end - 1`` of prompt + output."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:end] + self.output_ids[max(0, start - p):max(0, end - p)]

    @property
    def context_tokens(self) -> int:
        """Tokens whose K/V are cached."""
        return self.num_computed

    def append(self, token_id: int, logprob: float) -> FinishReason | None:
        """Record a sampled token; the finish reason if it ends the request."""
        out = self.output_ids
        out.append(token_id)
        self.logprobs.append(logprob)
        if token_id in self._stops:
            return FinishReason.STOP
        if len(out) >= self.sampling.max_tokens:
            return FinishReason.LENGTH
        return None
