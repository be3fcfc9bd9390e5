"""Decode attention read in place from the paged KV cache on the CPU: a small C kernel.

A decode step of the SDPA backend copies every row's K/V blocks into a workspace and then runs
SDPA over it: three passes over the context's bytes (read, write, read again) where attention
needs one, and on the CPU that traffic is most of its cost. This kernel walks each row's block
table and reads K and V where they lie, one row at a time with all its query heads (grouped-query
attention without expanding K/V), in one pass over the row's blocks with an online softmax (each
block's scores, then the running max and sum rescaled and the block's V added), all in float32,
exp included (a vectorised polynomial, not libm's scalar call). Within a block each query head
keeps its query (scores) or its accumulator (values) in registers over the block's tokens, four
scores share one horizontal-sum tree, and vectors are the machine's own width (8 floats on AVX2,
16 on AVX-512: wider generic vectors made GCC spill through the stack on AVX2).

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

/* exp(x) for x <= 0 (softmax's x - max): Cody-Waite reduction and Cephes' degree-6 polynomial,
   about 1 ulp, in arithmetic only so that its loops vectorise (libm's expf is a scalar call each:
   with 4 heads over a 530-token context that was a third of the kernel's time with warm caches). */
static inline float exp_nonpos(float x) {
    x = x < -87.33654f ? -87.33654f : x;  /* 2^-126: the smallest normal float, and -inf's image */
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = { .i = ((int32_t)n + 127) << 23 };
    return p * scale.f;
}

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

/* How many blocks ahead of the one being computed a row's K/V is prefetched (a row's blocks are
   anywhere in the cache, so the hardware prefetcher cannot guess the jump): two hid more of the
   memory's latency than one in a cold-cache micro-benchmark (4 rows x 530 tokens, 190 MB cache). */
#define PREFETCH_AHEAD 2

/* One row's job, in one pass over its blocks (online softmax, as flash-decoding does): for each
   block, the scores of its tokens for every query head, then each head's running max, sum and
   accumulator are rescaled to the new max and the block's V is added. K and V of a block lie side
   by side, so the row's context streams through once. For each KV head and each of its g query
   heads the head's query (scores) or accumulator (values) stays in registers over the block's
   tokens: a block's K/V of one KV head is read from L1 g times and from memory once. Inlined into
   callers with constant nv, so the loops over it unroll.
   s: [heads][bs] block scores, then [heads] maxima and [heads] sums; acc: [heads][nv]. */
static inline __attribute__((always_inline)) void job(
        const int64_t g, const int64_t nv, const int64_t hkv, const float *qb, const float *cache,
        const int32_t *row, int64_t ctx, int64_t tok, int64_t half, int64_t bs, float scale,
        float *s, vw *acc, float *ob) {
    const int64_t heads = g * hkv, nblocks = (ctx + bs - 1) / bs, d = nv * W;
    float *m = s + heads * bs, *l = m + heads;
    for (int64_t h = 0; h < heads; ++h) { m[h] = -INFINITY; l[h] = 0.0f; }
    for (int64_t x = 0; x < heads * nv; ++x) acc[x] = (vw){0};
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t t0 = blk * bs, n = ctx - t0 < bs ? ctx - t0 : bs;
        const float *kblock = cache + (int64_t)row[blk] * 2 * half, *vblock = kblock + half;
        const int64_t ahead = blk + PREFETCH_AHEAD;
        const char *next = ahead < nblocks ? (const char *)(cache + (int64_t)row[ahead] * 2 * half) : 0;
        for (int64_t h = 0; h < heads; ++h) {
            const vw *qh = (const vw *)(qb + h * d);
            const float *kh = kblock + (h / g) * d;
            float *sh = s + h * bs;
            /* the first head's pass prefetches that block's K, a slice per group of tokens: all of
               it at once filled the miss buffers and stalled */
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
        for (int64_t h = 0; h < heads; ++h) {
            float *sh = s + h * bs;
            float mb = m[h], sum = 0.0f;
            for (int64_t t = 0; t < n; ++t) mb = sh[t] > mb ? sh[t] : mb;
            #pragma omp simd reduction(+:sum)
            for (int64_t t = 0; t < n; ++t) {
                sh[t] = exp_nonpos(sh[t] - mb);
                sum += sh[t];
            }
            const float rescale = exp_nonpos(m[h] - mb);  /* the first block: exp(-inf) = 0 */
            l[h] = l[h] * rescale + sum;
            m[h] = mb;
            const float *vh = vblock + (h / g) * d;
            const char *pf = h == 0 && next ? next + half * sizeof(float) : 0;  /* that block's V */
            vw a[nv];
            for (int64_t c = 0; c < nv; ++c) a[c] = acc[h * nv + c] * rescale;
            for (int64_t i = 0; i < n; ++i) {
                if (pf) prefetch_tokens(pf, i, 1, tok);
                const vw *v = (const vw *)(vh + i * tok);
                const float p = sh[i];
                for (int64_t c = 0; c < nv; ++c) a[c] += p * v[c];
            }
            if (pf) prefetch_tokens(pf, n, bs - n, tok);
            for (int64_t c = 0; c < nv; ++c) acc[h * nv + c] = a[c];
        }
    }
    for (int64_t h = 0; h < heads; ++h) {
        const float inv = 1.0f / l[h];
        for (int64_t c = 0; c < nv; ++c) acc[h * nv + c] *= inv;
    }
    memcpy(ob, acc, sizeof(float) * (size_t)(heads * d));
}

#define CASE(NV) \
    if (nv == NV) { \
        job(g, NV, hkv, qb, cache, row, ctx, tok, half, bs, scale, s, acc, ob); \
        continue; \
    }

/* out[b, h, :] = softmax(scale * q[b, h] . K[b, :ctx_b, h / g]) V[b, :ctx_b, h / g] for every row b
   and query head h (g = heads / kv_heads), K/V read through the row's block table.
   cache: [N, 2, bs, hkv, d] contiguous float32 (K at index 0, V at 1); q: row stride q_row, head
   stride d; table: [B, *] int32 with row stride t_row; out: [B, heads, d] contiguous.
   d must be a multiple of 16 (the caller checks). */
int paged_decode(const float *q, int64_t q_row, const float *cache, const int32_t *table, int64_t t_row,
                 const int32_t *ctx_lens, float *out, int64_t batch, int64_t heads, int64_t hkv,
                 int64_t d, int64_t bs, float scale, int threads) {
    const int64_t g = heads / hkv, nv = d / W;
    const int64_t tok = hkv * d;            /* floats per token of one block half */
    const int64_t half = bs * tok;          /* floats of one block half (K or V) */
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(heads * (bs + 2) + heads * d));
        if (s == NULL) {
            #pragma omp atomic write
            failed = 1;
        } else {
            vw *acc = (vw *)(s + heads * (bs + 2));
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < batch; ++b) {
                const int64_t ctx = ctx_lens[b];
                const float *qb = q + b * q_row;  /* [heads][d] */
                const int32_t *row = table + b * t_row;
                float *ob = out + b * heads * d;
                CASE(2) CASE(4) CASE(8) CASE(16)
                job(g, nv, hkv, qb, cache, row, ctx, tok, half, bs, scale, s, acc, ob);
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
    fn.argtypes = [ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64,
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
                 context_lens: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] (rows may be strided; see ``supports``), cache [N, 2, bs, Hkv, D], block_table
    [B, M] int32 (row stride free, columns contiguous), context_lens [B] int32 -> [B, H, D]."""
    b, h, d = q.shape
    bs, hkv = cache.shape[2], cache.shape[3]
    table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    table = table if table.dtype == torch.int32 else table.to(torch.int32)
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty((b, h, d), dtype=q.dtype)
    failed = lib.paged_decode(q.data_ptr(), q.stride(0), cache.data_ptr(), table.data_ptr(), table.stride(0),
                              lens.data_ptr(), out.data_ptr(), b, h, hkv, d, bs,
                              d ** -0.5, torch.get_num_threads())
    if failed:
        raise MemoryError("paged decode kernel: out of memory for its score buffers")
    return out
