"""RoPE of q and k and the K/V write into the paged cache, on the CPU in float32, as one C kernel.

In eager torch this is a roll, three multiply/adds and two indexed writes per layer (six to nine
dispatched ops; ~37 us a layer for one decode row on the AVX2 bench machine, ~70 us for 32 rows);
the kernel rotates q and k in place in the fused q/k/v activation and copies each token's rotated K
and its V into its slot, in one pass over the rows. It computes ``x1 * c - x2 * s`` and
``x2 * c + x1 * s`` (c, s the cos and sin of each frequency) with floating-point contraction off,
so each product and sum is rounded as torch rounds it: bit-identical to ``apply_rotary`` and to
HF (tested). Built by ``worker_svc.native``; where it cannot be built, or for other dtypes,
devices and layouts, ``rope_write_kv`` returns False and the caller keeps the torch path.
"""

from __future__ import annotations

import ctypes

import torch

from worker_svc import native

_SOURCE = r"""
#pragma GCC optimize ("fp-contract=off")
#include <stdint.h>
#include <string.h>

/* qkv: [T, heads + 2 * hkv, d] contiguous: q heads, then k heads, then v heads. cos, sin: rows of
   cs_row floats, cos = (c, c) and signed sin = (-s, s) per token (RotaryEmbedding's tables).
   Rotates the q and k heads in place, then writes k and v of token t into cache[blocks[t], 0] and
   cache[blocks[t], 1] at offsets[t] ([N, 2, bs, hkv, d] contiguous). blocks and offsets: int32
   where wide32/off32 say so, else int64 (the step's tensors come in either). */
static inline int64_t at(const void *p, int is32, int64_t i) {
    return is32 ? (int64_t)((const int32_t *)p)[i] : ((const int64_t *)p)[i];
}

void rope_write_kv(float *qkv, const float *cos, const float *sin, int64_t cs_row, float *cache,
                   const void *blocks, int blocks32, const void *offsets, int offsets32, int64_t tokens,
                   int64_t heads, int64_t hkv, int64_t d, int64_t bs, int threads) {
    const int64_t half = d / 2, row = (heads + 2 * hkv) * d, tok = hkv * d;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tokens >= 64)
    for (int64_t t = 0; t < tokens; ++t) {
        float *x = qkv + t * row;
        const float *c = cos + t * cs_row, *s = sin + t * cs_row + half;
        for (int64_t h = 0; h < heads + hkv; ++h) {
            float *x1 = x + h * d, *x2 = x1 + half;
            #pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float a = x1[i], b = x2[i];
                const float ac = a * c[i], bs_ = b * s[i], bc = b * c[i], as = a * s[i];
                x1[i] = ac - bs_;
                x2[i] = bc + as;
            }
        }
        float *slot = cache + (at(blocks, blocks32, t) * 2 * bs + at(offsets, offsets32, t)) * tok;
        memcpy(slot, x + heads * d, sizeof(float) * (size_t)tok);
        memcpy(slot + bs * tok, x + (heads + hkv) * d, sizeof(float) * (size_t)tok);
    }
}
"""

ENABLED = True  # False: always torch (tests compare the two)


def _declare(handle: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    c_int = ctypes.c_int
    handle.rope_write_kv.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, c_int, ptr, c_int, i64, i64, i64, i64,
                                     i64, c_int]
    handle.rope_write_kv.restype = None


_KERNEL = native.Kernel("cpu_rope", _SOURCE, _declare)


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    return _KERNEL.load()


_INDEX = (torch.int32, torch.int64)


def _f32(t: torch.Tensor) -> bool:
    # (``is_cpu``, not ``device.type``: no device object per call, four tensors a layer every step)
    return t.is_cpu and t.dtype == torch.float32


def rope_write_kv(qkv: torch.Tensor, heads: int, cos: torch.Tensor, signed_sin: torch.Tensor,
                  cache: torch.Tensor, slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> bool:
    """Rotate the q and k heads of qkv [T, heads + 2 Hkv, D] in place (cos/signed_sin [T, D] from
    ``RotaryEmbedding``) and write k, v into their slots of cache [N, 2, bs, Hkv, D]. False where
    the kernel does not apply (then nothing was written)."""
    t, d = qkv.shape[0], qkv.shape[-1]
    hkv = (qkv.shape[1] - heads) // 2
    if not (ENABLED and qkv.dim() == 3 and cache.dim() == 5 and _f32(qkv) and _f32(cache) and _f32(cos)
            and _f32(signed_sin) and qkv.is_contiguous() and cache.is_contiguous() and d % 2 == 0
            and cache.shape[3:] == (hkv, d) and cos.shape == signed_sin.shape == (t, d)
            and cos.stride() == signed_sin.stride() and cos.stride(1) == 1
            and slot_blocks.dtype in _INDEX and slot_offsets.dtype in _INDEX
            and slot_blocks.shape == slot_offsets.shape == (t,)
            and slot_blocks.is_contiguous() and slot_offsets.is_contiguous()
            and not (qkv.requires_grad and torch.is_grad_enabled())):
        return False
    lib = _KERNEL.load()
    if lib is None:
        return False
    lib.rope_write_kv(qkv.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), cos.stride(0), cache.data_ptr(),
                      slot_blocks.data_ptr(), slot_blocks.dtype == torch.int32, slot_offsets.data_ptr(),
                      slot_offsets.dtype == torch.int32, t, heads, hkv, d, cache.shape[2],
                      torch.get_num_threads())
    return True
