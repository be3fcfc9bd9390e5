"""Attention over the paged KV cache: the metadata of one layer in one step, and two backends.

The KV tensor of the GPU tier is [N, 2, block_size, Hkv, D] (one block = one layer's K and V for
``block_size`` tokens, K at index 0 and V at 1, so a run of blocks is one contiguous copy). A step
of whole prompts attends only to their own fresh K/V (no prefix cache); any other step (decodes,
later prefill chunks, or both mixed) attends through a block table to the cached context.
``SdpaBackend`` uses torch ``scaled_dot_product_attention`` (CPU and GPU); ``FlashAttnBackend`` uses
flash-attn's varlen kernel for prefill and its paged kernel for decode when it is importable on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
        if len(set(meta.seq_lens)) == 1:  # equal lengths: one batched call
            b, n = len(meta.seq_lens), meta.seq_lens[0]
            qb = q.view(b, n, *q.shape[1:]).transpose(1, 2)  # [B, H, n, D]
            kb = k.view(b, n, *k.shape[1:]).transpose(1, 2)  # [B, Hkv, n, D]
            vb = v.view(b, n, *v.shape[1:]).transpose(1, 2)
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
            return o.transpose(1, 2).reshape(q.shape)
        outs = []
        start = 0
        for n in meta.seq_lens:
            qs = q[start:start + n].transpose(0, 1)  # [H, n, D]
            ks = k[start:start + n].transpose(0, 1)  # [Hkv, n, D]
            vs = v[start:start + n].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            outs.append(o.transpose(0, 1))  # [n, H, D]
            start += n
        return torch.cat(outs, dim=0)

    def decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Each request's new tokens over its cached context, causally. q [T, H, D] -> [T, H, D].

        One-token segments (decodes) go through one batched call; each longer segment (a prefill
        chunk after earlier chunks) attends to its blocks with a causal mask offset by its start.
        """
        assert meta.block_table is not None and meta.context_lens is not None
        if all(n == 1 for n in meta.seq_lens):
            return self._decode_rows(q, cache, meta.block_table, meta.context_lens)
        assert meta.context_list is not None
        out = torch.empty_like(q)
        starts = [0]
        for n in meta.seq_lens:
            starts.append(starts[-1] + n)
        singles = [i for i, n in enumerate(meta.seq_lens) if n == 1]
        if singles:
            rows = torch.tensor(singles, device=q.device)
            toks = torch.tensor([starts[i] for i in singles], device=q.device)
            out[toks] = self._decode_rows(q[toks], cache, meta.block_table[rows], meta.context_lens[rows])
        bs = cache.shape[2]
        for i, n in enumerate(meta.seq_lens):
            if n == 1:
                continue
            ctx = meta.context_list[i]
            blocks = meta.block_table[i, :-(-ctx // bs)].long()
            k = cache[blocks, 0].reshape(-1, *cache.shape[3:])[:ctx].transpose(0, 1)  # [Hkv, S, D]
            v = cache[blocks, 1].reshape(-1, *cache.shape[3:])[:ctx].transpose(0, 1)
            qs = q[starts[i]:starts[i + 1]].transpose(0, 1)  # [H, n, D]
            query_pos = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= query_pos[:, None]  # [n, S]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)
            out[starts[i]:starts[i + 1]] = o.transpose(0, 1)
        return out

    def _decode_rows(self, q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                     context_lens: torch.Tensor) -> torch.Tensor:
        """One new token per row over its cached context. q [B, H, D], block_table [B, M] -> [B, H, D]."""
        b, m = block_table.shape
        bs = cache.shape[2]
        gathered = cache[block_table.long()]  # [B, M, 2, bs, Hkv, D]
        k = gathered[:, :, 0].reshape(b, m * bs, *cache.shape[3:]).transpose(1, 2)  # [B, Hkv, S, D]
        v = gathered[:, :, 1].reshape(b, m * bs, *cache.shape[3:]).transpose(1, 2)
        pos = torch.arange(m * bs, device=cache.device)
        mask = (pos[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]
        o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, enable_gqa=True)
        return o[:, :, 0, :]  # [B, H, D]


class FlashAttnBackend(AttentionBackend):
    """flash-attn kernels (CUDA, float16/bfloat16). Decode uses the paged kernel when the block size
    is one it accepts (a multiple of 256), and SDPA over the gathered blocks otherwise."""

    name = "flash-attn"

    def __init__(self) -> None:
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
    """``auto``: flash-attn on CUDA with a half dtype when importable, SDPA otherwise."""
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
    return AttentionBackend()
