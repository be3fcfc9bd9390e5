"""Picks each request's next token from its logits: greedy, temperature, top-k, top-p, per-request seed.

The whole batch is sampled at once with tensor ops on the logits' device, in two groups. Greedy
rows take the argmax. Unseeded rows (the common case) get temperature and top-k, then top-p
among the ``NUCLEUS_CANDIDATES`` most likely tokens (a full sort only for a row whose nucleus is
larger), and one inverse-CDF draw each from one generator of the engine. Seeded rows, which have
a generator of their own, replay the row-wise sampler's ops batched (a full sort for top-p) and
its draw, the exponential race ``argmax(probs / E)`` with E ~ Exp(1) that ``torch.multinomial``
makes for one sample, E drawn on the CPU from the row's generator: their tokens are the very ids
the row-wise sampler drew before (the reference is kept in tests/sampling_rowwise.py).

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


@dataclass(slots=True)  # one per row per step
class SampledToken:
    token_id: int
    logprob: float


_MASK64 = (1 << 64) - 1
_NEG_INF = float("-inf")
# Unseeded top-p looks for the nucleus among this many most likely tokens (one topk instead of a
# sort of the vocabulary); a row whose nucleus is larger falls back to the sort.
NUCLEUS_CANDIDATES = 1024


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
    chosen = logits.argmax(dim=-1)  # [B]: greedy rows keep it
    seeded: list[int] = []
    draws: list[torch.Generator] = []
    unseeded: list[int] = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            # (``gen is not None`` first: isinstance on a torch.Generator class goes through a
            # slow metaclass check, a cost per row of every step)
            if gen is not None and isinstance(gen, PositionalGenerator):
                gen.position += 1  # every row advances, greedy or not: positions stay absolute
        elif gen is None:
            unseeded.append(row)
        else:
            seeded.append(row)
            draws.append(gen.next_draw() if isinstance(gen, PositionalGenerator) else gen)
    if unseeded:
        index, sub = _rows(logits, unseeded)
        picked = _inverse_cdf(_unseeded_weights(sub, [params[r] for r in unseeded]), rng)  # [U]
        chosen = picked if index is None else chosen.index_copy_(0, index, picked)
    if seeded:
        index, sub = _rows(logits, seeded)
        probs = _cut_distribution(sub, [params[r] for r in seeded])  # [S, V]
        picked = probs.div_(_seeded_exponentials(probs, draws)).argmax(dim=-1)  # [S]
        chosen = picked if index is None else chosen.index_copy_(0, index, picked)
    # Log-probs of the raw distribution, taken after the sampling temporaries are freed.
    lp = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0]  # [B]
    if logits.is_cpu:  # nothing to copy: each list straight from its tensor (3 ops fewer a step)
        # (a float32 element's Python float is its float64 value, as the device path gives)
        return list(map(SampledToken, chosen.tolist(), lp.tolist()))
    # One device-to-host copy for ids and log-probs (float64 holds every token id exactly).
    flat = torch.cat([chosen.double(), lp.double()]).tolist()
    return [SampledToken(int(t), v) for t, v in zip(flat[:batch], flat[batch:], strict=True)]


def _rows(x: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(index tensor or None for all rows, those rows of x)."""
    if len(rows) == x.shape[0]:
        return None, x
    index = torch.tensor(rows, device=x.device)
    return index, x.index_select(0, index)


def _scaled_top_k(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits / temperature [S, V] (a new tensor), tokens below each row's k-th largest at -inf."""
    vocab, dev = logits.shape[1], logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    scaled = logits / temps[:, None]
    ks = [p.top_k if p.top_k < vocab else 0 for p in params]  # 0: no top-k cut
    if any(ks):
        k = torch.tensor(ks, device=dev)
        top = torch.topk(scaled, max(ks), dim=-1).values  # [S, kmax], sorted descending
        kth = top.gather(1, (k - 1).clamp_(min=0)[:, None])  # [S, 1]: the k-th largest value
        kth.masked_fill_((k == 0)[:, None], _NEG_INF)  # rows without a cut keep every token
        scaled.masked_fill_(scaled < kth, _NEG_INF)
    return scaled


def _cut_distribution(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """probs [S, V] after each row's temperature, top-k and top-p, by a full sort for top-p.

    The ops are the row-wise sampler's, batched, in the same order on the same values, so on the
    CPU every row's probabilities are bit-for-bit those it computed (ties broken alike included).
    """
    scaled = _scaled_top_k(logits, params)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=logits.dtype, device=logits.device)
        index, part = _rows(scaled, nucleus)  # [N, V]
        part = _sorted_nucleus(part, top_p)
        if index is not None:
            scaled.index_copy_(0, index, part)
    return torch.softmax(scaled, dim=-1)


def _sorted_nucleus(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scaled [N, V] with every token outside each row's nucleus at -inf (in place)."""
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # [N, V] each
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
    drop = torch.cumsum(sorted_probs, dim=-1).sub_(sorted_probs) >= top_p[:, None]  # in place: less memory
    del sorted_probs
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return scaled.scatter_(1, order, sorted_logits)  # back to vocabulary order (a permutation)


def _unseeded_weights(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Unnormalised probabilities [U, V] after temperature, top-k and top-p, zero outside the cuts;
    the nucleus from the most likely ``NUCLEUS_CANDIDATES`` tokens, sorted only when it is larger."""
    scaled = _scaled_top_k(logits, params)
    probs = torch.softmax(scaled, dim=-1)  # [U, V]
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if not nucleus:
        return probs
    top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=probs.dtype, device=probs.device)
    index, part = _rows(probs, nucleus)  # [N, V]
    values, ids = torch.topk(part, min(NUCLEUS_CANDIDATES, part.shape[1]), dim=-1)  # [N, C] sorted
    mass = torch.cumsum(values, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
    drop = (mass - values) >= top_p[:, None]  # [N, C]
    cut = torch.ones_like(part, dtype=torch.bool).scatter_(1, ids, drop)  # outside the candidates: cut
    part = part.masked_fill_(cut, 0.0)
    wide = [n for n, ok in enumerate((mass[:, -1] >= top_p).tolist()) if not ok]
    if wide:  # nuclei larger than the candidates (flat distributions): those rows by a sort
        rows = torch.tensor(wide, device=probs.device)
        sorted_rows = _sorted_nucleus(scaled.index_select(0, rows if index is None else index[rows]),
                                      top_p[rows])
        part.index_copy_(0, rows, torch.softmax(sorted_rows, dim=-1))
    if index is not None:
        probs.index_copy_(0, index, part)
    return probs


def _inverse_cdf(weights: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """One draw per row [U] from unnormalised weights [U, V], by one uniform each from ``rng``."""
    cdf = torch.cumsum(weights, dim=-1)  # [U, V], non-decreasing
    total = cdf[:, -1:].contiguous()  # [U, 1]
    u = torch.rand(total.shape, generator=rng, dtype=cdf.dtype, device=cdf.device)
    picked = torch.searchsorted(cdf, u * total, right=True)  # the first token whose cdf passes u
    # u * total can round up to the total: never past the last token with weight.
    last = torch.searchsorted(cdf, total)
    return torch.minimum(picked, last)[:, 0]


def _seeded_exponentials(probs: torch.Tensor, draws: list[torch.Generator]) -> torch.Tensor:
    """E [S, V] ~ Exp(1), each row from its own CPU generator exactly as ``torch.multinomial``
    draws it for one sample (``empty_like(p).exponential_(1, gen)``)."""
    host = torch.empty(probs.shape, dtype=probs.dtype)  # on the CPU: the old stream
    for row, gen in enumerate(draws):
        host[row].exponential_(generator=gen)
    return host.to(probs.device)
