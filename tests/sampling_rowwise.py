"""The row-wise sampler before issue 9, kept verbatim as the reference of the batched one.

``tests/test_sampling.py`` asserts that the batched ``worker_svc.sampling.sample`` draws the very
same token ids for seeded rows, and ``benchmarks/sampling_detok.py`` times both.
"""

from __future__ import annotations

import torch

from common.types import SamplingParams
from worker_svc.sampling import PositionalGenerator, SampledToken


def sample_rowwise(logits: torch.Tensor, params: list[SamplingParams],
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
