"""The SLOs of a benchmark: given in seconds, or as a multiple of the batch-1 figures of the fleet.

A TPOT-bound benchmark sets the TPOT SLO just above what one request alone gets (``--tpot-slo
1.5x``: 1.5 times the batch-1 decode step), so any policy that batches carelessly misses it; the
TTFT SLO may be derived the same way from the batch-1 TTFT of the workload's prompt. The batch-1
figures come from one of two sources, behind ``batch1_times``: the cost model the workers advertise
(``ListWorkers``; once they profile it at start-up) or a probe, a few lone requests sent through
the fleet and timed by the client.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from common.errors import InvalidArgument
from common.types import CostModel

SloBasis = Literal["auto", "cost-model", "probe"]
BASES: tuple[SloBasis, ...] = ("auto", "cost-model", "probe")


@dataclass(frozen=True)
class SloTarget:
    """One SLO as asked for: fixed seconds, or a multiple of the batch-1 figure."""

    seconds: float | None = None
    multiple: float | None = None

    def __post_init__(self) -> None:
        assert (self.seconds is None) != (self.multiple is None), "exactly one of seconds, multiple"

    @classmethod
    def parse(cls, text: str, what: str) -> SloTarget:
        """``0.05`` (seconds) or ``1.5x`` (times the batch-1 figure)."""
        raw = text.strip().lower()
        is_multiple = raw.endswith("x")
        try:
            value = float(raw[:-1] if is_multiple else raw)
        except ValueError as exc:
            raise InvalidArgument(f"{what} {text!r} must be seconds (0.05) or a multiple (1.5x)") from exc
        if not (value > 0 and math.isfinite(value)):
            raise InvalidArgument(f"{what} {text!r} must be positive")
        return cls(multiple=value) if is_multiple else cls(seconds=value)

    def resolve(self, batch1_s: float | None) -> float:
        if self.seconds is not None:
            return self.seconds
        assert self.multiple is not None and batch1_s is not None, "a multiple needs the batch-1 figure"
        return self.multiple * batch1_s

    def label(self) -> str:
        return f"{self.seconds:g} s" if self.seconds is not None else f"{self.multiple:g}x batch-1"


@dataclass(frozen=True)
class Batch1Times:
    """What one request alone gets on the fleet."""

    ttft_s: float  # time to the first token of a prompt of ``prompt_tokens``
    step_s: float  # one decode step (the TPOT of a lone request)
    prompt_tokens: int
    source: Literal["cost-model", "probe"]


@dataclass(frozen=True)
class Slos:
    """The SLOs every request of the invocation is sent with, and where they came from."""

    ttft_s: float
    tpot_s: float
    ttft: SloTarget
    tpot: SloTarget
    batch1: Batch1Times | None  # None when both were given in seconds


def needs_batch1(ttft: SloTarget, tpot: SloTarget) -> bool:
    return ttft.multiple is not None or tpot.multiple is not None


def resolve_slos(ttft: SloTarget, tpot: SloTarget, batch1: Batch1Times | None) -> Slos:
    return Slos(
        ttft_s=ttft.resolve(batch1.ttft_s if batch1 else None),
        tpot_s=tpot.resolve(batch1.step_s if batch1 else None),
        ttft=ttft,
        tpot=tpot,
        batch1=batch1,
    )


def is_profiled(cost: CostModel) -> bool:
    """Whether a worker advertises a measured model rather than the built-in defaults."""
    return cost != CostModel()


def from_cost_models(costs: Sequence[CostModel], prompt_tokens: int) -> Batch1Times:
    """Batch-1 figures predicted by the workers' cost models: the slowest worker's (every worker
    must be able to meet the SLO with one request alone)."""
    if not costs:
        raise InvalidArgument("no worker advertises a cost model")
    return Batch1Times(
        ttft_s=max(c.prefill_s(prompt_tokens) for c in costs),
        step_s=max(c.decode_step_s(1, prompt_tokens) for c in costs),
        prompt_tokens=prompt_tokens,
        source="cost-model",
    )


def from_probe(ttfts: Sequence[float], tpots: Sequence[float], prompt_tokens: int) -> Batch1Times:
    """Batch-1 figures measured by lone probe requests: the median of each (robust to one hiccup)."""
    if not ttfts or not tpots:
        raise InvalidArgument("the batch-1 probe completed no request with two or more tokens")
    return Batch1Times(statistics.median(ttfts), statistics.median(tpots), prompt_tokens, "probe")


def choose_source(basis: SloBasis, costs: Sequence[CostModel]) -> Literal["cost-model", "probe"]:
    """``auto``: the cost model when every worker advertises a profiled one, else the probe."""
    if basis == "auto":
        return "cost-model" if costs and all(is_profiled(c) for c in costs) else "probe"
    return basis


def probe_prompts(prompt_tokens: int, repeats: int, vocab_high: int, seed: int) -> list[tuple[int, ...]]:
    """Distinct prompts for the probe (a repeated prompt could be served from a cache)."""
    rng = random.Random(f"{seed}:probe")
    return [tuple(rng.randrange(vocab_high) for _ in range(prompt_tokens)) for _ in range(repeats)]
