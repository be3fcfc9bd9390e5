"""Attention over the paged KV cache: the metadata of one layer in one step, and two backends.

The KV tensor of the GPU tier is [N, 2, block_size, Hkv, D] (one block = one layer's K and V for
``block_size`` tokens, K at index 0 and V at 1, so a run of blocks is one contiguous copy). A step
of whole prompts attends only to their own fresh K/V (no prefix cache); any other step (decodes,
later prefill chunks, or both mixed) attends through a block table to the cached context.
``AttentionBackend`` uses torch ``scaled_dot_product_attention`` (CPU and GPU), and on the CPU in
float32 its decode steps read the paged blocks in place with ``worker_svc.paged_decode`` and its
prefill steps (whole prompts, and chunks after earlier chunks over the paged cache) run the blocked
kernel of ``worker_svc.prefill_attention`` (``auto``; ``sdpa`` keeps torch only);
``FlashAttnBackend`` uses flash-attn's varlen kernel for prefill and its paged kernel for decode
when it is importable on CUDA.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from worker_svc import paged_decode, prefill_attention


@dataclass
class AttentionMetadata:
    """Where one layer's new K/V go and what decode attention reads, for one step."""

    is_prefill: bool
    slot_blocks: torch.Tensor  # [T] int64: block id (GPU-tier tensor) receiving each new token's K/V
    slot_offsets: torch.Tensor  # [T] int64: position inside that block
    seq_lens: list[int]  # new tokens of each request in this step (1 for a decode)
    cu_seqlens: torch.Tensor | None = None  # [B+1] int32 prefix sums of seq_lens
    block_table: torch.Tensor | None = None  # [B, M] int32 block ids, padded with 0 (not is_prefill)
    context_lens: torch.Tensor | None = None  # [B] int32 tokens each request attends to, new ones included
    max_context: int = 0
    context_list: list[int] | None = None  # context_lens on the host (chunks longer than one token)


# Longest whole prompt whose causal attention takes SDPA's flash kernel with ``enable_gqa`` rather
# than K/V expanded per query head (see causal_attention): per layer on one core, 32 prompts of
# 128 tokens 10.1 against 12.9 ms (4 heads over 2), 23.3 against 26.0 (9 over 3); one of 512 tokens
# 4.5 against 4.8; one of 2048 tokens 43 against 39 and 121 against 84 (docs/benchmarks.md).
GQA_FLASH_MAX_TOKENS = 512


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``n`` queries that are the last ``n`` of ``S`` positions, causally. q [..., H, n, D],
    k/v [..., Hkv, S, D] -> [..., H, n, D].

    A whole prompt (n == S) up to ``GQA_FLASH_MAX_TOKENS`` takes the flash kernel with
    ``enable_gqa`` (torch 2.13's CPU flash kernel maps each query head to its KV head itself, so the
    K/V are not copied per query head). Otherwise K/V are expanded to every query head first: a
    longer prompt ran faster on the expanded heads, and with an explicit mask ``enable_gqa`` falls
    back to SDPA's math kernel on CPU (it materialises [H, n, S] scores), where the expanded heads
    with a lower-right causal bias (a chunk after earlier chunks) take the fused flash kernel,
    several times faster for long prompts."""
    if q.dim() == 3:  # the flash kernel takes 4-D inputs only: one batch row
        return causal_attention(q[None], k[None], v[None])[0]
    groups = q.shape[-3] // k.shape[-3]
    n, s = q.shape[-2], k.shape[-2]
    if n == s and n <= GQA_FLASH_MAX_TOKENS:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    if n == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, s))


class AttentionBackend:
    """Torch SDPA over the paged cache; the reference backend."""

    name = "sdpa"

    def write_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Scatter k, v [T, Hkv, D] into their slots."""
        cache[meta.slot_blocks, 0, meta.slot_offsets] = k
        cache[meta.slot_blocks, 1, meta.slot_offsets] = v

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of each packed prompt over itself. q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        if self._prefill is not None and prefill_attention.supports(q, k, v):
            return prefill_attention.prompts(self._prefill, q, k, v, meta.seq_lens)
        if len(set(meta.seq_lens)) == 1:  # equal lengths: one batched call
            b, n = len(meta.seq_lens), meta.seq_lens[0]
            qb = q.view(b, n, *q.shape[1:]).transpose(1, 2)  # [B, H, n, D]
            kb = k.view(b, n, *k.shape[1:]).transpose(1, 2)  # [B, Hkv, n, D]
            vb = v.view(b, n, *v.shape[1:]).transpose(1, 2)
            o = causal_attention(qb, kb, vb)
            return o.transpose(1, 2).reshape(q.shape)
        outs = []
        start = 0
        for n in meta.seq_lens:
            qs = q[start:start + n].transpose(0, 1)  # [H, n, D]
            ks = k[start:start + n].transpose(0, 1)  # [Hkv, n, D]
            vs = v[start:start + n].transpose(0, 1)
            outs.append(causal_attention(qs, ks, vs).transpose(0, 1))  # [n, H, D]
            start += n
        return torch.cat(outs, dim=0)

    def __init__(self, native_decode: bool = False) -> None:
        # The in-place CPU decode kernel and the blocked CPU prefill kernel (None: torch only, or
        # it could not be built).
        self._native: ctypes.CDLL | None = paged_decode.load() if native_decode else None
        self._prefill: ctypes.CDLL | None = prefill_attention.load() if native_decode else None
        self._work: torch.Tensor | None = None  # gather workspace, reused by every layer and step
        # Most blocks one gather can need (the engine's memory plan budgets exactly this much):
        # growth by doubling stops there. None: unbounded.
        self.max_gather_blocks: int | None = None

    def _gather(self, cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's K and V, each [B, M * bs, Hkv, D], copied from the cache by two index_selects
        (the K halves of the blocks of ``block_table``, then the V halves), with no per-request or
        per-block work. The copy goes into a persistent workspace: a fresh tensor this size per
        layer costs more in page faults than the copy itself."""
        assert meta.block_table is not None
        b, m = meta.block_table.shape
        block = cache.shape[2:]  # (bs, Hkv, D)
        n = b * m
        if (self._work is None or self._work.shape[1] < n or self._work.shape[2:] != block
                or self._work.dtype != cache.dtype or self._work.device != cache.device):
            grown = max(n, 2 * self._work.shape[1]) if self._work is not None else n
            if self.max_gather_blocks is not None:
                grown = max(n, min(grown, self.max_gather_blocks))
            self._work = None  # free the old workspace first: the peak is one workspace, not two
            self._work = torch.empty((2, grown, *block), dtype=cache.dtype, device=cache.device)
        ids = meta.block_table.reshape(-1)  # [B * M]
        torch.index_select(cache[:, 0], 0, ids, out=self._work[0, :n])
        torch.index_select(cache[:, 1], 0, ids, out=self._work[1, :n])
        k = self._work[0, :n].view(b, m * block[0], *block[1:])
        v = self._work[1, :n].view(b, m * block[0], *block[1:])
        return k, v  # [B, S, Hkv, D] each

    def decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Each request's new tokens over its cached context, causally. q [T, H, D] -> [T, H, D].

        One-token segments (decodes) go through one batched call; each longer segment (a prefill
        chunk after earlier chunks) attends to its gathered rows with a causal mask offset by its start.
        """
        assert meta.block_table is not None and meta.context_lens is not None
        decodes = len(meta.seq_lens) == q.shape[0]  # one token per row
        if decodes and self._native is not None and paged_decode.supports(q, cache):
            return paged_decode.paged_decode(self._native, q, cache, meta.block_table, meta.context_lens)
        if not decodes and self._prefill is not None and prefill_attention.supports_cache(q, cache):
            # prefill chunks (and any decodes beside them) read the paged cache in place
            return prefill_attention.chunks(self._prefill, q, cache, meta.block_table, meta.context_lens,
                                            meta.seq_lens)
        k_all, v_all = self._gather(cache, meta)  # [B, S, Hkv, D]
        if decodes:
            return self._decode_rows(q, k_all, v_all, meta)
        assert meta.context_list is not None
        out = torch.empty_like(q)
        starts = [0]
        for n in meta.seq_lens:
            starts.append(starts[-1] + n)
        singles = [i for i, n in enumerate(meta.seq_lens) if n == 1]
        if singles:
            rows = torch.tensor(singles, device=q.device)
            toks = torch.tensor([starts[i] for i in singles], device=q.device)
            mask = self._mask(meta.context_lens[rows], k_all.shape[1])
            out[toks] = self._attend(q[toks], k_all[rows], v_all[rows], mask)
        for i, n in enumerate(meta.seq_lens):
            if n == 1:
                continue
            ctx = meta.context_list[i]
            k = k_all[i, :ctx].transpose(0, 1)  # [Hkv, S, D]
            v = v_all[i, :ctx].transpose(0, 1)
            qs = q[starts[i]:starts[i + 1]].transpose(0, 1)  # [H, n, D]
            out[starts[i]:starts[i + 1]] = causal_attention(qs, k, v).transpose(0, 1)
        return out

    @staticmethod
    def _mask(context_lens: torch.Tensor, s: int) -> torch.Tensor:
        pos = torch.arange(s, device=context_lens.device)
        return (pos[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]

    def _decode_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     meta: AttentionMetadata) -> torch.Tensor:
        """One new token per row. q [B, H, D], k/v [B, S, Hkv, D] -> [B, H, D]."""
        if q.shape[0] == 1:  # one row: attend to exactly its context, no mask needed
            return self._attend(q, k[:, :meta.max_context], v[:, :meta.max_context], None)
        assert meta.context_lens is not None
        return self._attend(q, k, v, self._mask(meta.context_lens, k.shape[1]))

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, H, D], k/v [B, S, Hkv, D] (strided views are fine) -> [B, H, D]."""
        o = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=True)
        return o[:, :, 0, :]


class FlashAttnBackend(AttentionBackend):
    """flash-attn kernels (CUDA, float16/bfloat16). Decode uses the paged kernel when the block size
    is one it accepts (a multiple of 256), and SDPA over the gathered blocks otherwise."""

    name = "flash-attn"

    def __init__(self) -> None:
        super().__init__()
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen = flash_attn_varlen_func
        self._kvcache = flash_attn_with_kvcache

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        assert meta.cu_seqlens is not None
        n = max(meta.seq_lens)
        return self._varlen(q, k, v, meta.cu_seqlens, meta.cu_seqlens, n, n, causal=True)

    def decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if cache.shape[2] % 256 != 0 or any(n != 1 for n in meta.seq_lens):
            return super().decode(q, cache, meta)  # chunks after earlier chunks: the SDPA path
        assert meta.block_table is not None and meta.context_lens is not None
        out = self._kvcache(q[:, None], cache[:, 0], cache[:, 1], cache_seqlens=meta.context_lens,
                            block_table=meta.block_table, causal=True)
        return out[:, 0]


def select_backend(device: torch.device, dtype: torch.dtype, name: str = "auto") -> AttentionBackend:
    """``auto``: flash-attn on CUDA with a half dtype when importable, SDPA otherwise (with the
    in-place decode kernel on the CPU); ``sdpa``: torch's SDPA only."""
    if name == "sdpa":
        return AttentionBackend()
    usable = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if name in ("auto", "flash-attn") and usable:
        try:
            return FlashAttnBackend()
        except ImportError:
            if name == "flash-attn":
                raise
    if name == "flash-attn":
        raise ValueError("the flash-attn backend needs CUDA and float16/bfloat16")
    return AttentionBackend(native_decode=device.type == "cpu" and dtype == torch.float32)
