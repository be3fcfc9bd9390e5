"""Picks each request's next token from its logits: greedy, temperature, top-k, top-p, per-request seed.

Log-probs are always those of the model's raw distribution (before temperature and cuts), so they
are comparable across sampling settings and with HuggingFace ``compute_transition_scores``. The
random draw of a token depends only on (seed, absolute position of the token in prompt + output):
a request rerun from its prompt plus the tokens already generated (a requeue) continues the very
stream the first run would have produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.types import SamplingParams


@dataclass
class SampledToken:
    token_id: int
    logprob: float


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The generator seed of the draw at ``position`` (splitmix64 of the pair; < 2**63)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class PositionalGenerator(torch.Generator):
    """A CPU generator re-seeded for every token from (seed, absolute position of that token)."""

    def __new__(cls, seed: int, position: int = 0) -> PositionalGenerator:
        return super().__new__(cls, device="cpu")  # type: ignore[call-arg]

    def __init__(self, seed: int, position: int = 0) -> None:
        self.base_seed = seed
        self.position = position  # absolute position of the next token: len(prompt) + len(output)

    def next_draw(self) -> torch.Generator:
        """Seeded for the token at ``position``; advances to the next position."""
        self.manual_seed(position_seed(self.base_seed, self.position))
        self.position += 1
        return self


def make_generator(seed: int, position: int = 0) -> torch.Generator:
    """The random stream of one request whose next token is at absolute ``position`` (its prompt
    length: a rerun from prompt + generated tokens passes the longer length and continues)."""
    return PositionalGenerator(seed, position)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator]) -> list[SampledToken]:
    """logits [B, V] float32 (any device); one ``SamplingParams`` and generator per row."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    greedy_ids = logits.argmax(dim=-1)  # [B]
    picked: list[int] = greedy_ids.tolist()
    for row, p in enumerate(params):
        gen = generators[row]
        if isinstance(gen, PositionalGenerator):
            gen = gen.next_draw()  # every row advances, greedy or not: positions stay absolute
        if not p.greedy:
            picked[row] = _sample_row(logits[row].cpu(), p, gen)
    chosen = torch.tensor(picked, device=logits.device)
    lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    return [SampledToken(t, float(v)) for t, v in zip(picked, lp, strict=True)]


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """logits [V] on CPU."""
    scaled = logits / p.temperature
    if p.top_k > 0 and p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
