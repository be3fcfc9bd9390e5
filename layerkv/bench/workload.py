"""The benchmark workload: Poisson arrivals, prompt and output lengths, all drawn from one seed.

A ``WorkloadSpec`` is the typed description (rate, prompt-length distribution, output lengths,
request count, seed); ``generate`` turns it into the exact list of ``BenchRequest`` that every
policy of one invocation receives, so policies are compared on identical traffic. Torch-free.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import InvalidArgument


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload."""

    index: int  # position in arrival order
    arrival_s: float  # seconds after the start of the run
    prompt_token_ids: tuple[int, ...]
    max_tokens: int  # output length (the request ignores EOS, so it generates exactly this many)


class PromptLengths(BaseModel):
    """How prompt lengths are drawn: one fixed length, or a long-tailed (log-normal) distribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fixed", "lognormal"] = Field(default="fixed", description="fixed length or log-normal")
    tokens: int = Field(default=512, ge=1, description="fixed length, or the median of the log-normal")
    sigma: float = Field(default=1.0, gt=0.0, le=4.0, description="log-normal shape (larger: longer tail)")
    min_tokens: int = Field(default=1, ge=1, description="lower clip of drawn lengths")
    max_tokens: int = Field(default=1 << 20, ge=1, description="upper clip of drawn lengths")

    @model_validator(mode="after")
    def _check_clip(self) -> PromptLengths:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}")
        return self

    @classmethod
    def parse(cls, text: str) -> PromptLengths:
        """``512`` (fixed) or ``lognormal:MEDIAN[:SIGMA[:MIN:MAX]]``."""
        parts = text.strip().split(":")
        try:
            if len(parts) == 1:
                return cls(kind="fixed", tokens=int(parts[0]))
            if parts[0] == "lognormal" and len(parts) in (2, 3, 5):
                sigma = float(parts[2]) if len(parts) >= 3 else 1.0
                clip = {"min_tokens": int(parts[3]), "max_tokens": int(parts[4])} if len(parts) == 5 else {}
                return cls(kind="lognormal", tokens=int(parts[1]), sigma=sigma, **clip)
        except ValueError as exc:
            raise InvalidArgument(f"prompt length {text!r}: {exc}") from exc
        raise InvalidArgument(f"prompt length {text!r} must be N or lognormal:MEDIAN[:SIGMA[:MIN:MAX]]")

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.tokens
        drawn = round(rng.lognormvariate(math.log(self.tokens), self.sigma))
        return min(self.max_tokens, max(self.min_tokens, drawn))

    def label(self) -> str:
        if self.kind == "fixed":
            return str(self.tokens)
        return f"lognormal:{self.tokens}:{self.sigma:g}:{self.min_tokens}:{self.max_tokens}"


class WorkloadSpec(BaseModel):
    """One point of a benchmark: everything needed to regenerate its requests exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(gt=0.0, description="mean arrivals per second (Poisson)")
    num_requests: int = Field(ge=1, description="requests in the run")
    prompt: PromptLengths
    output_min: int = Field(ge=1, description="shortest output, tokens")
    output_max: int = Field(ge=1, description="longest output, tokens (uniform between the two)")
    seed: int = Field(default=0, description="seed of arrivals, lengths and token ids")
    vocab_low: int = Field(default=0, ge=0, description="prompt token ids are drawn from [low, high)")
    vocab_high: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _check_ranges(self) -> WorkloadSpec:
        if self.output_min > self.output_max:
            raise ValueError(f"output_min {self.output_min} > output_max {self.output_max}")
        if self.vocab_low >= self.vocab_high:
            raise ValueError(f"vocab_low {self.vocab_low} must be below vocab_high {self.vocab_high}")
        return self


def generate(spec: WorkloadSpec) -> list[BenchRequest]:
    """The requests of ``spec``, in arrival order; the same spec always gives the same list."""
    # Separate streams so that, e.g., changing the output lengths keeps the same arrivals.
    arrivals = random.Random(f"{spec.seed}:arrivals")
    lengths = random.Random(f"{spec.seed}:prompts")
    outputs = random.Random(f"{spec.seed}:outputs")
    tokens = random.Random(f"{spec.seed}:tokens")
    requests: list[BenchRequest] = []
    t = 0.0
    for index in range(spec.num_requests):
        if index:  # the first request arrives at t = 0
            t += arrivals.expovariate(spec.rate)
        n = spec.prompt.draw(lengths)
        ids = tuple(tokens.randrange(spec.vocab_low, spec.vocab_high) for _ in range(n))
        requests.append(BenchRequest(index, t, ids, outputs.randint(spec.output_min, spec.output_max)))
    return requests


def parse_floats(text: str, what: str) -> list[float]:
    """``"1,2.5,4"`` → ``[1.0, 2.5, 4.0]`` (a sweep), each strictly positive."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise InvalidArgument(f"{what} {text!r} must be comma-separated numbers") from exc
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise InvalidArgument(f"{what} {text!r} must be one or more positive numbers")
    return values


def parse_prompt_sweep(text: str) -> list[PromptLengths]:
    """``"128,512,1024"`` (a sweep of fixed lengths) or one ``lognormal:...`` spec."""
    if text.strip().startswith("lognormal"):
        return [PromptLengths.parse(text)]
    return [PromptLengths.parse(part) for part in text.split(",") if part.strip()]
