"""Picks each request's next token from its logits: greedy, temperature, top-k, top-p, per-request seed.

Log-probs are always those of the model's raw distribution (before temperature and cuts), so they
are comparable across sampling settings and with HuggingFace ``compute_transition_scores``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.types import SamplingParams


@dataclass
class SampledToken:
    token_id: int
    logprob: float


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator]) -> list[SampledToken]:
    """logits [B, V] float32 (any device); one ``SamplingParams`` and generator per row."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    greedy_ids = logits.argmax(dim=-1)  # [B]
    picked: list[int] = greedy_ids.tolist()
    for row, p in enumerate(params):
        if not p.greedy:
            picked[row] = _sample_row(logits[row].cpu(), p, generators[row])
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
