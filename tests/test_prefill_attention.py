"""Prefill attention (worker_svc.attention.causal_attention and the backend's prefill) against a
plain softmax reference: whole prompts through the GQA flash call up to GQA_FLASH_MAX_TOKENS and
through expanded heads above it, chunks after earlier chunks, packed prompts of unequal lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker_svc import attention
from worker_svc.attention import AttentionBackend, AttentionMetadata, causal_attention


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [..., H, n, D] as the last n of S positions, k/v [..., Hkv, S, D], in float64."""
    groups = q.shape[-3] // k.shape[-3]
    k64 = k.double().repeat_interleave(groups, dim=-3)
    v64 = v.double().repeat_interleave(groups, dim=-3)
    n, s = q.shape[-2], k.shape[-2]
    scores = q.double() @ k64.transpose(-1, -2) / q.shape[-1] ** 0.5
    allowed = torch.ones(n, s, dtype=torch.bool).tril(diagonal=s - n)
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v64).to(q.dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (4, 4)])
@pytest.mark.parametrize("n", [1, 7, 64, attention.GQA_FLASH_MAX_TOKENS + 3])
def test_whole_prompts_match_the_reference(heads: int, kv_heads: int, n: int) -> None:
    torch.manual_seed(n)
    q, k, v = torch.randn(3, heads, n, 16), torch.randn(3, kv_heads, n, 16), torch.randn(3, kv_heads, n, 16)
    torch.testing.assert_close(causal_attention(q, k, v), _reference(q, k, v), rtol=1e-4, atol=1e-5)
    # one batch row given as 3-D
    torch.testing.assert_close(causal_attention(q[1], k[1], v[1]), _reference(q[1], k[1], v[1]),
                               rtol=1e-4, atol=1e-5)


def test_a_chunk_after_earlier_chunks_matches_the_reference() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 5, 16), torch.randn(2, 21, 16), torch.randn(2, 21, 16)
    torch.testing.assert_close(causal_attention(q, k, v), _reference(q, k, v), rtol=1e-4, atol=1e-5)


def test_short_prompts_take_the_gqa_call_long_ones_expanded_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which SDPA call each prompt length makes (the speed choice of GQA_FLASH_MAX_TOKENS)."""
    seen: list[tuple[int, bool]] = []
    real = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.append((k.shape[-3], bool(kw.get("enable_gqa", False))))
        return real(q, k, v, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    limit = attention.GQA_FLASH_MAX_TOKENS
    for n in (limit, limit + 1):
        causal_attention(torch.randn(4, n, 8), torch.randn(2, n, 8), torch.randn(2, n, 8))
    assert seen == [(2, True), (4, False)]


def test_backend_prefill_of_equal_and_unequal_prompts_matches_each_prompt_alone() -> None:
    torch.manual_seed(2)
    backend = AttentionBackend()
    for lens in ([6, 6, 6], [3, 9, 1]):
        t = sum(lens)
        q, k, v = torch.randn(t, 4, 16), torch.randn(t, 2, 16), torch.randn(t, 2, 16)
        meta = AttentionMetadata(is_prefill=True, slot_blocks=torch.zeros(t, dtype=torch.int64),
                                 slot_offsets=torch.zeros(t, dtype=torch.int64), seq_lens=lens)
        got = backend.prefill(q, k, v, meta)
        start = 0
        for n in lens:
            sl = slice(start, start + n)
            want = _reference(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1))
            torch.testing.assert_close(got[sl], want.transpose(0, 1), rtol=1e-4, atol=1e-5)
            start += n
