"""The blocked CPU prefill attention kernel (worker_svc.prefill_attention) against a float64 softmax
reference: whole packed prompts and chunks over the paged cache, grouped-query groups 1/2/3, lengths
that are not multiples of its tiles, rows strided as the model's q/k/v views are, extreme scores;
and the SDPA backend taking it for prefill steps and chunk steps on the CPU in float32."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker_svc import prefill_attention
from worker_svc.attention import AttentionBackend, AttentionMetadata, causal_attention

LIB = prefill_attention.load()
pytestmark = pytest.mark.skipif(LIB is None, reason="no C compiler: the torch path is used")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] as the last n of S positions, k/v [S, Hkv, D] -> [n, H, D], in float64."""
    g = q.shape[1] // k.shape[1]
    qd = q.double().transpose(0, 1)
    kd = k.double().repeat_interleave(g, dim=1).transpose(0, 1)
    vd = v.double().repeat_interleave(g, dim=1).transpose(0, 1)
    n, s = q.shape[0], k.shape[0]
    scores = qd @ kd.transpose(-1, -2) / q.shape[-1] ** 0.5
    allowed = torch.ones(n, s, dtype=torch.bool).tril(diagonal=s - n)
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vd).transpose(0, 1)


def _qkv(t: int, heads: int, kv_heads: int, d: int, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """q, k, v as strided views of one [T, H + 2 Hkv, D] projection (as the model makes them)."""
    qkv = torch.randn(t, heads + 2 * kv_heads, d) * scale
    return qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]


def _check_prompts(lens: list[int], heads: int, kv_heads: int, d: int, scale: float = 1.0) -> None:
    assert LIB is not None
    q, k, v = _qkv(sum(lens), heads, kv_heads, d, scale)
    assert prefill_attention.supports(q, k, v)
    got = prefill_attention.prompts(LIB, q, k, v, lens)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        torch.testing.assert_close(got[sl].double(), _reference(q[sl], k[sl], v[sl]), rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (9, 3)])
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("n", [1, 5, 47, 130, 301])
def test_whole_prompts_match_the_reference(heads: int, kv_heads: int, d: int, n: int) -> None:
    torch.manual_seed(n * 7 + d)
    _check_prompts([n], heads, kv_heads, d)


def test_packed_prompts_of_unequal_lengths_match_each_alone() -> None:
    torch.manual_seed(3)
    _check_prompts([3, 100, 1, 64, 65, 7], 4, 2, 64)


def test_extreme_scores_are_as_close_to_the_reference_as_torch() -> None:
    """Scores hundreds apart (exp far below the row's max underflows to about zero, not garbage):
    float32 scores that large carry rounding of their own, so the bound is torch SDPA's error."""
    assert LIB is not None
    torch.manual_seed(4)
    q, k, v = _qkv(90, 4, 2, 64, scale=8.0)
    want = _reference(q, k, v)
    got = prefill_attention.prompts(LIB, q, k, v, [90]).double()
    sdpa = causal_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 2 * (sdpa.double() - want).abs().max() + 1e-6


def _paged(ctx_lens: list[int], kv_heads: int, d: int,
           bs: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A cache [N, 2, bs, Hkv, D] holding each request's context in shuffled blocks, its block table
    (padded with 0), and each request's K/V [ctx, 2, Hkv, D] as written."""
    blocks = [-(-c // bs) for c in ctx_lens]
    n = sum(blocks) + 3
    cache = torch.randn(n, 2, bs, kv_heads, d)
    ids = torch.randperm(n - 1)[:sum(blocks)] + 1  # block 0 only ever pads the table
    table = torch.zeros(len(ctx_lens), max(blocks), dtype=torch.int32)
    kvs, used = [], 0
    for b, c in enumerate(ctx_lens):
        row = ids[used:used + blocks[b]]
        used += blocks[b]
        table[b, :len(row)] = row.to(torch.int32)
        kvs.append(cache[row.long()].transpose(1, 2).reshape(-1, 2, kv_heads, d)[:c])  # [ctx, 2, Hkv, D]
    return cache, table, kvs


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (9, 3)])
@pytest.mark.parametrize("bs", [16, 32])
def test_chunks_after_cached_context_match_the_reference(heads: int, kv_heads: int, bs: int) -> None:
    """A chunk after earlier chunks, a first chunk (context == chunk), a decode beside them, and a
    chunk whose context is not a multiple of the block size or the tiles."""
    assert LIB is not None
    torch.manual_seed(bs + heads)
    d = 64
    new = [23, 40, 1, 130]
    ctx = [70, 40, 33, 301]
    cache, table, kvs = _paged(ctx, kv_heads, d, bs)
    q = torch.randn(sum(new), heads + 2 * kv_heads, d)[:, :heads]  # strided rows
    assert prefill_attention.supports_cache(q, cache)
    got = prefill_attention.chunks(LIB, q, cache, table, torch.tensor(ctx, dtype=torch.int32), new)
    start = 0
    for b, n in enumerate(new):
        sl = slice(start, start + n)
        want = _reference(q[sl], kvs[b][:, 0], kvs[b][:, 1])
        torch.testing.assert_close(got[sl].double(), want, rtol=1e-5, atol=1e-5)
        start += n


def test_threads_give_the_same_result() -> None:
    assert LIB is not None
    torch.manual_seed(5)
    lens = [50, 9, 77, 128]
    q, k, v = _qkv(sum(lens), 4, 2, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prefill_attention.prompts(LIB, q, k, v, lens)
        torch.set_num_threads(2)
        two = prefill_attention.prompts(LIB, q, k, v, lens)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each (request, KV head) is one thread's work: same order of sums


def test_layouts_it_does_not_take_are_refused() -> None:
    q, k, v = _qkv(8, 4, 2, 64)
    assert not prefill_attention.supports(q.double(), k.double(), v.double())
    assert not prefill_attention.supports(q.transpose(0, 1), k, v)
    q24, k24, v24 = _qkv(8, 4, 2, 24)  # head dim not a multiple of 16
    assert not prefill_attention.supports(q24, k24, v24)


def test_backend_takes_the_kernel_for_prompts_and_chunks_and_matches_sdpa(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU float32 backend's prefill and chunk steps go through the kernel, with the results of
    the torch-only backend."""
    calls: list[str] = []
    real_prompts, real_chunks = prefill_attention.prompts, prefill_attention.chunks

    def spy_prompts(*args: Any) -> torch.Tensor:
        calls.append("prompts")
        return real_prompts(*args)

    def spy_chunks(*args: Any) -> torch.Tensor:
        calls.append("chunks")
        return real_chunks(*args)

    monkeypatch.setattr(prefill_attention, "prompts", spy_prompts)
    monkeypatch.setattr(prefill_attention, "chunks", spy_chunks)
    native, torch_only = AttentionBackend(native_decode=True), AttentionBackend()
    torch.manual_seed(6)
    lens = [6, 6, 6]
    t = sum(lens)
    q, k, v = _qkv(t, 4, 2, 64)
    zeros = torch.zeros(t, dtype=torch.int64)
    meta = AttentionMetadata(is_prefill=True, slot_blocks=zeros, slot_offsets=zeros, seq_lens=lens)
    torch.testing.assert_close(native.prefill(q, k, v, meta), torch_only.prefill(q, k, v, meta),
                               rtol=1e-5, atol=1e-5)
    new, ctx = [5, 1, 17], [21, 9, 17]
    cache, table, _ = _paged(ctx, 2, 64, 16)
    q = torch.randn(sum(new), 4, 64)
    zeros = torch.zeros(sum(new), dtype=torch.int64)
    lens_t = torch.tensor(ctx, dtype=torch.int32)
    meta = AttentionMetadata(is_prefill=False, slot_blocks=zeros, slot_offsets=zeros, seq_lens=new,
                             block_table=table, context_lens=lens_t, max_context=max(ctx), context_list=ctx)
    torch.testing.assert_close(native.decode(q, cache, meta), torch_only.decode(q, cache, meta),
                               rtol=1e-5, atol=1e-5)
    assert calls == ["prompts", "chunks"]
