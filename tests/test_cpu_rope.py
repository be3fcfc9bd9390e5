"""The CPU RoPE + K/V write kernel gives exactly what ``apply_rotary`` and the backend's
``write_kv`` give (bit for bit), and declines what it does not take (the caller keeps torch)."""

from __future__ import annotations

import pytest
import torch

from worker_svc.attention import AttentionBackend, AttentionMetadata
from worker_svc.model import cpu_rope
from worker_svc.model.config import ModelConfig
from worker_svc.model.llama import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(cpu_rope.load() is None, reason="no C compiler to build the kernel")


def _rope(d: int) -> RotaryEmbedding:
    config = ModelConfig(architecture="llama", vocab_size=32, hidden_size=4 * d, intermediate_size=8,
                         num_layers=1, num_heads=4, num_kv_heads=2, head_dim=d, max_position_embeddings=4096)
    return RotaryEmbedding(config)


@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "d", "bs"), [(1, 4, 2, 64, 16), (37, 9, 3, 64, 16),
                                                                      (300, 8, 1, 128, 5), (5, 6, 6, 32, 1)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_kernel_is_bit_identical_to_the_torch_path(tokens: int, heads: int, kv_heads: int, d: int,
                                                   bs: int, index_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cos, sin = _rope(d)(torch.randint(0, 4000, (tokens,)), torch.float32)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, d)
    n = tokens // bs + 4
    slots = torch.randperm(n * bs)[:tokens]  # scattered, distinct slots
    blocks, offsets = (slots // bs).to(index_dtype), slots % bs  # blocks come int32 from a step
    want_cache = torch.zeros(n, 2, bs, kv_heads, d)
    meta = AttentionMetadata(is_prefill=True, slot_blocks=blocks, slot_offsets=offsets, seq_lens=[tokens])
    qk = apply_rotary(qkv[:, :heads + kv_heads], cos, sin)
    AttentionBackend().write_kv(want_cache, qk[:, heads:], qkv[:, heads + kv_heads:], meta)
    got, got_cache = qkv.clone(), torch.zeros_like(want_cache)
    assert cpu_rope.rope_write_kv(got, heads, cos, sin, got_cache, blocks, offsets)
    assert torch.equal(got[:, :heads + kv_heads], qk)
    assert torch.equal(got[:, heads + kv_heads:], qkv[:, heads + kv_heads:])  # v untouched
    assert torch.equal(got_cache, want_cache)


def test_declines_what_it_does_not_take() -> None:
    cos, sin = _rope(16)(torch.arange(3), torch.float32)
    cache = torch.zeros(4, 2, 2, 1, 16)
    blocks, offsets = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])
    qkv = torch.randn(3, 4, 16)
    before = qkv.clone()
    assert not cpu_rope.rope_write_kv(qkv.double(), 2, cos.double(), sin.double(), cache.double(), blocks,
                                      offsets)
    assert not cpu_rope.rope_write_kv(torch.randn(3, 4, 32)[..., ::2], 2, cos, sin, cache, blocks, offsets)
    assert not cpu_rope.rope_write_kv(qkv, 2, cos, sin, cache, blocks.short(), offsets)
    two_kv_heads = torch.zeros(4, 2, 2, 2, 16)  # qkv has one
    assert not cpu_rope.rope_write_kv(qkv, 2, cos, sin, two_kv_heads, blocks, offsets)
    assert torch.equal(qkv, before) and not cache.any()
