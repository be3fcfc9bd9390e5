"""Picks each request's next token from its logits: greedy, temperature, top-k, top-p, per-request seed.

The whole batch is sampled at once with tensor ops on the logits' device: temperature, top-k and
top-p cuts for every row together, then one exponential race (``argmax(probs / E)``, E ~ Exp(1):
the draw ``torch.multinomial`` makes for one sample) for every sampled row. Greedy rows take the
argmax. Only a seeded request has a generator of its own; its E row is drawn on the CPU from
that generator, so its tokens are the very ids the row-wise sampler drew before (the reference
is kept in tests/sampling_rowwise.py). Unseeded rows draw their E together from one generator
of the engine.

Log-probs are always those of the model's raw distribution (before temperature and cuts), so they
are comparable across sampling settings and with HuggingFace ``compute_transition_scores``. The
random draw of a seeded request depends only on (seed, absolute position of the token in prompt +
output): a request rerun from its prompt plus the tokens already generated (a requeue) continues
the very stream the first run would have produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.types import SamplingParams


@dataclass
class SampledToken:
    token_id: int
    logprob: float


_MASK64 = (1 << 64) - 1
_NEG_INF = float("-inf")


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


def make_batch_generator(device: torch.device, seed: int) -> torch.Generator:
    """The generator of the unseeded rows' draws, on the logits' device (one per engine)."""
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None],
           rng: torch.Generator | None = None) -> list[SampledToken]:
    """logits [B, V] float32 on any device; one ``SamplingParams`` and generator per row.

    A row's generator is its request's own (a seed asked for it; a ``PositionalGenerator`` is
    re-seeded for the row's position) or None: an unseeded row, drawn with the other unseeded rows
    from ``rng`` (a generator on the logits' device; None: torch's default one).
    """
    batch = logits.shape[0]
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V] of the raw distribution
    chosen = logits.argmax(dim=-1)  # [B]: greedy rows keep it
    rows: list[int] = []
    draws: list[torch.Generator | None] = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            if isinstance(gen, PositionalGenerator):
                gen.position += 1  # every row advances, greedy or not: positions stay absolute
            continue
        rows.append(row)
        draws.append(gen.next_draw() if isinstance(gen, PositionalGenerator) else gen)
    if rows:
        index = None if len(rows) == batch else torch.tensor(rows, device=logits.device)
        sub = logits if index is None else logits.index_select(0, index)  # [S, V]
        probs = _cut_distribution(sub, [params[r] for r in rows])  # [S, V]
        # The exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p (what multinomial
        # does for one sample, so a seeded row's E from its generator gives the old token).
        picked = probs.div_(_exponentials(probs, draws, rng)).argmax(dim=-1)  # [S]
        chosen = picked if index is None else chosen.index_copy_(0, index, picked)
    lp = logprobs.gather(1, chosen[:, None])[:, 0]  # [B]
    # One device-to-host copy for ids and log-probs (float64 holds every token id exactly).
    flat = torch.cat([chosen.double(), lp.double()]).tolist()
    return [SampledToken(int(t), v) for t, v in zip(flat[:batch], flat[batch:], strict=True)]


def _cut_distribution(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """probs [S, V] after each row's temperature, top-k and top-p (logits [S, V], rows to sample).

    The ops are the row-wise sampler's, batched, in the same order on the same values, so on the
    CPU every row's probabilities are bit-for-bit those it computed (ties broken alike included).
    """
    num_rows, vocab = logits.shape
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    scaled = logits / temps[:, None]  # [S, V]: a new tensor the cuts below overwrite in place
    ks = [p.top_k if p.top_k < vocab else 0 for p in params]  # 0: no top-k cut
    if any(ks):
        k = torch.tensor(ks, device=dev)
        top = torch.topk(scaled, max(ks), dim=-1).values  # [S, kmax], sorted descending
        kth = top.gather(1, (k - 1).clamp_(min=0)[:, None])  # [S, 1]: the k-th largest value
        kth.masked_fill_((k == 0)[:, None], _NEG_INF)  # rows without a cut keep every token
        scaled.masked_fill_(scaled < kth, _NEG_INF)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        index = None if len(nucleus) == num_rows else torch.tensor(nucleus, device=dev)
        part = scaled if index is None else scaled.index_select(0, index)  # [N, V]
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=logits.dtype, device=dev)
        sorted_logits, order = torch.sort(part, dim=-1, descending=True)  # [N, V] each
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p[:, None]
        del sorted_probs
        sorted_logits.masked_fill_(drop, _NEG_INF)
        part.scatter_(1, order, sorted_logits)  # back to vocabulary order (order is a permutation)
        if index is not None:
            scaled.index_copy_(0, index, part)
    return torch.softmax(scaled, dim=-1)


def _exponentials(probs: torch.Tensor, draws: list[torch.Generator | None],
                  rng: torch.Generator | None) -> torch.Tensor:
    """E [S, V] ~ Exp(1): a seeded row's from its CPU generator, exactly as ``torch.multinomial``
    draws it (``empty_like(p).exponential_(1, gen)``); the unseeded rows' in one op from ``rng``."""
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(draws) if g is None]
    if len(unseeded) == len(draws):
        return noise.exponential_(generator=rng)
    if unseeded:
        index = torch.tensor(unseeded, device=probs.device)
        rest = torch.empty((len(unseeded), probs.shape[1]), dtype=probs.dtype, device=probs.device)
        noise.index_copy_(0, index, rest.exponential_(generator=rng))
    seeded = [i for i, g in enumerate(draws) if g is not None]
    host = torch.empty((len(seeded), probs.shape[1]), dtype=probs.dtype)  # on the CPU: the old stream
    for n, i in enumerate(seeded):
        host[n].exponential_(generator=draws[i])
    if probs.device.type == "cpu" and len(seeded) == len(draws):
        return host
    noise.index_copy_(0, torch.tensor(seeded, device=probs.device), host.to(probs.device))
    return noise
