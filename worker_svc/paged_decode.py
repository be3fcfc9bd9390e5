"""Decode attention read in place from the paged KV cache on the CPU: a small C kernel.

A decode step of the SDPA backend copies every row's K/V blocks into a workspace and then runs
SDPA over it: three passes over the context's bytes (read, write, read again) where attention
needs one, and on the CPU that traffic is most of its cost. This kernel walks each row's block
table and reads K and V where they lie, one row at a time with all its query heads (grouped-query
attention without expanding K/V): scores, an exact softmax (max, then exp and sum), then the
weighted sum of V, all in float32. Within a block each query head keeps its query (scores) or its
accumulator (values) in registers over the block's tokens, four scores share one horizontal-sum
tree, and vectors are the machine's own width (8 floats on AVX2, 16 on AVX-512): on the AVX2 bench
machine a batch-32 layer (context ~150, 4 heads over 2 KV heads) took 0.6-0.7 ms against ~1.0 ms
for the earlier 16-float version, which GCC spilled through the stack there.

The C source below is built by ``worker_svc.native`` (the system C compiler, once per machine, cached
in the user's cache folder, loaded with ctypes). Where no compiler is found or the build fails,
``load()`` returns None and the backend keeps its torch path (logged once).
"""

from __future__ import annotations

import ctypes

import torch

from worker_svc import native

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* W floats: the machine's native vector (AVX-512: 16, else 8); aligned(4): loads may be unaligned.
   Wider generic vectors than the hardware's made GCC spill through the stack on AVX2 (4x slower). */
#ifdef __AVX512F__
#define W 16
#else
#define W 8
#endif
typedef float vw __attribute__((vector_size(W * 4), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

static inline float hsum(vw v) {  /* a tree: a chain of W scalar adds would bound the kernel */
#if W == 16
    typedef float v8 __attribute__((vector_size(32), aligned(4)));
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vw a = v;
#endif
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

typedef float v8 __attribute__((vector_size(32), aligned(4)));

static inline v8 fold8(vw v) {  /* W lanes summed down to 8 */
#if W == 16
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    return v;
#endif
}

/* Pairwise sums of a and b: lanes (a0+a1, a2+a3, b0+b1, b2+b3) of each 128-bit half (vhaddps). */
static inline v8 hadd8(v8 a, v8 b) {
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14)
         + __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

/* The four horizontal sums of a0..a3 in one vector: three pairwise sums and one fold, where four
   separate trees took six operations each (the score pass is bound by them, not by its FMAs). */
static inline v4 hsum4(vw a0, vw a1, vw a2, vw a3) {
    v8 t = hadd8(hadd8(fold8(a0), fold8(a1)), hadd8(fold8(a2), fold8(a3)));
    return __builtin_shufflevector(t, t, 0, 1, 2, 3) + __builtin_shufflevector(t, t, 4, 5, 6, 7);
}

/* Prefetch tokens [i, i + count) of a block half (tok floats each: every KV head of one token). */
static inline void prefetch_tokens(const char *block, int64_t i, int64_t count, int64_t tok) {
    const char *p = block + i * tok * 4;
    for (int64_t line = 0; line < count * tok * 4; line += 64) __builtin_prefetch(p + line);
}

/* One row's job: every query head over the row's context, block by block. Within a block, for each
   KV head and each of its g query heads, the head's query (nv vectors) stays in registers over the
   block's tokens (scores), then its accumulator does (weighted sum of V): the block's K/V of one KV
   head (bs * d floats) is read from L1 g times, and from memory once. The next block is prefetched
   while this one is computed (a row's blocks are anywhere in the cache, so the hardware prefetcher
   cannot guess the jump). Inlined into callers with constant nv, so the loops over it unroll.
   s: [heads][max_ctx] scores; acc: [heads][nv] accumulators. */
static inline __attribute__((always_inline)) void job(
        const int64_t g, const int64_t nv, const int64_t hkv, const float *qb, const float *cache,
        const int32_t *row, int64_t ctx, int64_t tok, int64_t half, int64_t bs, int64_t max_ctx,
        float scale, float *s, vw *acc, float *ob) {
    const int64_t heads = g * hkv, nblocks = (ctx + bs - 1) / bs, d = nv * W;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t t0 = blk * bs, n = ctx - t0 < bs ? ctx - t0 : bs;
        const float *kblock = cache + (int64_t)row[blk] * 2 * half;
        const char *next = blk + 1 < nblocks ? (const char *)(cache + (int64_t)row[blk + 1] * 2 * half)
                                             : 0;
        for (int64_t h = 0; h < heads; ++h) {
            const vw *qh = (const vw *)(qb + h * d);
            const float *kh = kblock + (h / g) * d;
            float *sh = s + h * max_ctx + t0;
            /* the first head's pass prefetches the next block's K, a slice per group of tokens:
               all of it at once filled the miss buffers and stalled */
            const char *pf = h == 0 ? next : 0;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) {
                if (pf) prefetch_tokens(pf, i, 4, tok);
                const vw *k0 = (const vw *)(kh + i * tok), *k1 = (const vw *)(kh + (i + 1) * tok);
                const vw *k2 = (const vw *)(kh + (i + 2) * tok), *k3 = (const vw *)(kh + (i + 3) * tok);
                vw a0 = qh[0] * k0[0], a1 = qh[0] * k1[0], a2 = qh[0] * k2[0], a3 = qh[0] * k3[0];
                for (int64_t c = 1; c < nv; ++c) {
                    a0 += qh[c] * k0[c]; a1 += qh[c] * k1[c]; a2 += qh[c] * k2[c]; a3 += qh[c] * k3[c];
                }
                const v4 r = hsum4(a0, a1, a2, a3) * scale;
                memcpy(sh + i, &r, sizeof r);
            }
            for (; i < n; ++i) {
                if (pf) prefetch_tokens(pf, i, 1, tok);
                const vw *k = (const vw *)(kh + i * tok);
                vw a = qh[0] * k[0];
                for (int64_t c = 1; c < nv; ++c) a += qh[c] * k[c];
                sh[i] = hsum(a) * scale;
            }
            if (pf) prefetch_tokens(pf, n, bs - n, tok);
        }
    }
    for (int64_t h = 0; h < heads; ++h) {
        float *sh = s + h * max_ctx;
        float m = -INFINITY, sum = 0.0f;
        #pragma omp simd reduction(max:m)
        for (int64_t t = 0; t < ctx; ++t) m = sh[t] > m ? sh[t] : m;
        for (int64_t t = 0; t < ctx; ++t) sh[t] = expf(sh[t] - m);
        #pragma omp simd reduction(+:sum)
        for (int64_t t = 0; t < ctx; ++t) sum += sh[t];
        const float inv = 1.0f / sum;
        #pragma omp simd
        for (int64_t t = 0; t < ctx; ++t) sh[t] *= inv;
    }
    for (int64_t x = 0; x < heads * nv; ++x) acc[x] = (vw){0};
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t t0 = blk * bs, n = ctx - t0 < bs ? ctx - t0 : bs;
        const float *vblock = cache + (int64_t)row[blk] * 2 * half + half;
        const char *next = blk + 1 < nblocks
            ? (const char *)(cache + (int64_t)row[blk + 1] * 2 * half + half) : 0;
        for (int64_t h = 0; h < heads; ++h) {
            const float *vh = vblock + (h / g) * d;
            const float *ph = s + h * max_ctx + t0;
            const char *pf = h == 0 ? next : 0;
            vw a[nv];
            for (int64_t c = 0; c < nv; ++c) a[c] = acc[h * nv + c];
            for (int64_t i = 0; i < n; ++i) {
                if (pf) prefetch_tokens(pf, i, 1, tok);
                const vw *v = (const vw *)(vh + i * tok);
                const float p = ph[i];
                for (int64_t c = 0; c < nv; ++c) a[c] += p * v[c];
            }
            if (pf) prefetch_tokens(pf, n, bs - n, tok);
            for (int64_t c = 0; c < nv; ++c) acc[h * nv + c] = a[c];
        }
    }
    memcpy(ob, acc, sizeof(float) * (size_t)(heads * d));
}

#define CASE(NV) \
    if (nv == NV) { \
        job(g, NV, hkv, qb, cache, row, ctx, tok, half, bs, max_ctx, scale, s, acc, ob); \
        continue; \
    }

/* out[b, h, :] = softmax(scale * q[b, h] . K[b, :ctx_b, h / g]) V[b, :ctx_b, h / g] for every row b
   and query head h (g = heads / kv_heads), K/V read through the row's block table.
   cache: [N, 2, bs, hkv, d] contiguous float32 (K at index 0, V at 1); q: row stride q_row, head
   stride d; table: [B, *] int32 with row stride t_row; out: [B, heads, d] contiguous.
   d must be a multiple of 16 (the caller checks). */
int paged_decode(const float *q, int64_t q_row, const float *cache, const int32_t *table, int64_t t_row,
                 const int32_t *ctx_lens, float *out, int64_t batch, int64_t heads, int64_t hkv,
                 int64_t d, int64_t bs, int64_t max_ctx, float scale, int threads) {
    const int64_t g = heads / hkv, nv = d / W;
    const int64_t tok = hkv * d;            /* floats per token of one block half */
    const int64_t half = bs * tok;          /* floats of one block half (K or V) */
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(heads * max_ctx + heads * d));
        if (s == NULL) {
            #pragma omp atomic write
            failed = 1;
        } else {
            vw *acc = (vw *)(s + heads * max_ctx);
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < batch; ++b) {
                const int64_t ctx = ctx_lens[b];
                const float *qb = q + b * q_row;  /* [heads][d] */
                const int32_t *row = table + b * t_row;
                float *ob = out + b * heads * d;
                CASE(2) CASE(4) CASE(8) CASE(16)
                job(g, nv, hkv, qb, cache, row, ctx, tok, half, bs, max_ctx, scale, s, acc, ob);
            }
            free(s);
        }
    }
    return failed;
}
"""



def _declare(handle: ctypes.CDLL) -> None:
    fn = handle.paged_decode
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64,
                   ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int


KERNEL = native.Kernel("paged_decode", _SOURCE, _declare)


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    return KERNEL.load()


def supports(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether ``paged_decode`` takes these tensors (CPU float32, the layouts it reads)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and cache.dtype == torch.float32
            and cache.is_contiguous() and q.dim() == 3 and q.stride(2) == 1 and q.stride(1) == q.shape[2]
            and q.shape[2] % 16 == 0)


def paged_decode(lib: ctypes.CDLL, q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                 context_lens: torch.Tensor, max_context: int) -> torch.Tensor:
    """q [B, H, D] (rows may be strided; see ``supports``), cache [N, 2, bs, Hkv, D], block_table
    [B, M] int32 (row stride free, columns contiguous), context_lens [B] int32 -> [B, H, D]."""
    b, h, d = q.shape
    bs, hkv = cache.shape[2], cache.shape[3]
    table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    table = table if table.dtype == torch.int32 else table.to(torch.int32)
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty((b, h, d), dtype=q.dtype)
    failed = lib.paged_decode(q.data_ptr(), q.stride(0), cache.data_ptr(), table.data_ptr(), table.stride(0),
                              lens.data_ptr(), out.data_ptr(), b, h, hkv, d, bs, max(1, max_context),
                              d ** -0.5, torch.get_num_threads())
    if failed:
        raise MemoryError("paged decode kernel: out of memory for its score buffers")
    return out
