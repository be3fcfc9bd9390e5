"""Decode attention read in place from the paged KV cache on the CPU: a small C kernel.

A decode step of the SDPA backend copies every row's K/V blocks into a workspace and then runs
SDPA over it: three passes over the context's bytes (read, write, read again) where attention
needs one, and on the CPU that traffic is most of its cost. This kernel walks each row's block
table and reads K and V where they lie, one row at a time with all its query heads (grouped-query
attention without expanding K/V), in one pass over the row's blocks with an online softmax (each
block's scores, then the running max and sum rescaled and the block's V added), all in float32,
exp included (a vectorised polynomial, not libm's scalar call). Within a block each query head
keeps its query (scores) or its accumulator (values) in registers over the block's tokens (fixed
register arrays: a variable-length one spilled to the stack), four scores share one
horizontal-sum tree, the block's max and exp run on whole vectors, and vectors are the machine's
own width (8 floats on AVX2, 16 on AVX-512: wider generic vectors made GCC spill through the stack
on AVX2). The blocks two ahead (past a row's end, the next row's first ones) are prefetched a few
cache lines per step of the block's work, so memory keeps streaming while the block is computed.

The C source below is built by ``worker_svc.native`` (the system C compiler, once per machine, cached
in the user's cache folder, loaded with ctypes). Where no compiler is found or the build fails,
``load()`` returns None and the backend keeps its torch path (logged once).
"""

from __future__ import annotations

import ctypes

import torch

from worker_svc import native

_SOURCE = native.SIMD_PRELUDE + r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef float v4 __attribute__((vector_size(16), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));

/* How many blocks ahead of the one being computed a row's K/V is prefetched (a row's blocks are
   anywhere in the cache, so the hardware prefetcher cannot guess the jump). 1, 2 and 4 measured
   alike once the prefetches were spread over the block's work (cold-cache micro-benchmark). */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2
#endif

static inline float hsum(vw v) {  /* a tree: a chain of W scalar adds would bound the kernel */
#if W == 16
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vw a = v;
#endif
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
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
   separate trees took six operations each. */
static inline v4 hsum4(vw a0, vw a1, vw a2, vw a3) {
    v8 t = hadd8(hadd8(fold8(a0), fold8(a1)), hadd8(fold8(a2), fold8(a3)));
    return __builtin_shufflevector(t, t, 0, 1, 2, 3) + __builtin_shufflevector(t, t, 4, 5, 6, 7);
}

static inline vw vsel(vi m, vw a, vw b) { return (vw)((m & (vi)a) | (~m & (vi)b)); }  /* m ? a : b */

/* exp(x) for x <= 0 (softmax's x - max), about 1 ulp, in arithmetic only (libm's expf is a scalar
   call each): the prelude's exp_in_range below its floor (2^-126, also -inf's image). The scalar
   form is for the one rescale factor a head takes per block. */
static inline float exp_nonpos(float x) { return exp_in_range(x < -87.33654f ? -87.33654f : x); }

static inline vw vexp_nonpos(vw x) {
    const vw lo = (vw){0} - 87.33654f;
    return vexp_in_range(vsel(x < lo, lo, x));
}

/* Cache lines still to prefetch, issued a few at a time between the computation's own loads:
   all of a block at once filled the miss buffers and stalled the loads behind them. */
typedef struct { const char *p, *end; } stream;
static inline void prefetch(stream *st, int64_t lines) {
    for (int64_t k = 0; k < lines && st->p < st->end; ++k, st->p += 64) __builtin_prefetch(st->p);
}

/* V accumulators of one pass over a block's tokens: 8 vectors stay in registers on AVX2 (16 of
   them); wider heads take several passes. A variable-length array here (the former kernel's)
   lived on the stack, and the value pass ran at the speed of store-to-load forwarding. */
#define CH 8

/* One row's job, in one pass over its blocks (online softmax, as flash-decoding does): for each
   block, the scores of its tokens for every query head, then each head's running max, sum and
   accumulator are rescaled to the new max and the block's V is added. K and V of a block lie side
   by side, so the row's context streams through once; the block PREFETCH_AHEAD ahead (past the
   row's end: the next row's first blocks) is prefetched a few lines per step of the block's work.
   Each query head keeps its query (scores: four tokens at a time, two accumulators per token so
   the chains of FMAs are half as long) or its accumulator (values) in registers over the block's
   tokens: a block's K/V of one KV head is read from L1 g times and from memory once. Inlined into
   callers with constant nv, so the loops over it unroll.
   s: [heads][sp] block scores (sp: bs rounded up to W); m, l: [heads] running max and sum;
   acc: [heads][nv]. */
static inline __attribute__((always_inline)) void job(
        const int64_t g, const int64_t nv, const int64_t hkv, const float *qb, const float *cache,
        const int32_t *row, int64_t ctx, const int32_t *nrow, int64_t nctx,
        int64_t tok, int64_t half, int64_t bs, int64_t sp, float scale,
        float *s, float *m, float *l, vw *acc, float *ob) {
    const int64_t heads = g * hkv, nblocks = (ctx + bs - 1) / bs, d = nv * W;
    const int64_t nnext = nrow ? (nctx + bs - 1) / bs : 0;
    const int64_t half_lines = (half * 4 + 63) / 64;
    vi lane;
    for (int w = 0; w < W; ++w) lane[w] = w;
    for (int64_t h = 0; h < heads; ++h) { m[h] = -INFINITY; l[h] = 0.0f; }
    for (int64_t x = 0; x < heads * nv; ++x) acc[x] = (vw){0};
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t t0 = blk * bs, n = ctx - t0 < bs ? ctx - t0 : bs;
        const float *kblock = cache + (int64_t)row[blk] * 2 * half, *vblock = kblock + half;
        const int64_t ahead = blk + PREFETCH_AHEAD;
        const float *next = ahead < nblocks ? cache + (int64_t)row[ahead] * 2 * half
                          : ahead - nblocks < nnext ? cache + (int64_t)nrow[ahead - nblocks] * 2 * half : 0;
        /* its K over this block's score steps, its V over the value steps */
        stream sk = { (const char *)next, next ? (const char *)(next + half) : 0 };
        stream sv = { sk.end, next ? (const char *)(next + 2 * half) : 0 };
        const int64_t kstep = (half_lines + heads * ((n + 3) / 4) - 1) / (heads * ((n + 3) / 4));
        const int64_t vstep = (half_lines + heads * n - 1) / (heads * n);
        for (int64_t h = 0; h < heads; ++h) {
            const vw *qh = (const vw *)(qb + h * d);
            const float *kh = kblock + (h / g) * d;
            float *sh = s + h * sp;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) {
                prefetch(&sk, kstep);
                const vw *k0 = (const vw *)(kh + i * tok), *k1 = (const vw *)(kh + (i + 1) * tok);
                const vw *k2 = (const vw *)(kh + (i + 2) * tok), *k3 = (const vw *)(kh + (i + 3) * tok);
                vw a0 = qh[0] * k0[0], a1 = qh[0] * k1[0], a2 = qh[0] * k2[0], a3 = qh[0] * k3[0];
                vw b0 = (vw){0}, b1 = (vw){0}, b2 = (vw){0}, b3 = (vw){0};
                int64_t c = 1;
                for (; c + 1 < nv; c += 2) {
                    b0 += qh[c] * k0[c]; b1 += qh[c] * k1[c]; b2 += qh[c] * k2[c]; b3 += qh[c] * k3[c];
                    a0 += qh[c + 1] * k0[c + 1]; a1 += qh[c + 1] * k1[c + 1];
                    a2 += qh[c + 1] * k2[c + 1]; a3 += qh[c + 1] * k3[c + 1];
                }
                for (; c < nv; ++c) {
                    b0 += qh[c] * k0[c]; b1 += qh[c] * k1[c]; b2 += qh[c] * k2[c]; b3 += qh[c] * k3[c];
                }
                const v4 r = hsum4(a0 + b0, a1 + b1, a2 + b2, a3 + b3) * scale;
                memcpy(sh + i, &r, sizeof r);
            }
            if (i < n) prefetch(&sk, kstep);
            for (; i < n; ++i) {
                const vw *k = (const vw *)(kh + i * tok);
                vw a = qh[0] * k[0];
                for (int64_t c = 1; c < nv; ++c) a += qh[c] * k[c];
                sh[i] = hsum(a) * scale;
            }
        }
        prefetch(&sk, half_lines);  /* what the rounding of kstep left */
        for (int64_t h = 0; h < heads; ++h) {
            float *sh = s + h * sp;
            for (int64_t t = n; t < sp; ++t) sh[t] = -INFINITY;  /* the padding takes no part */
            vw mv = *(const vw *)sh;
            for (int64_t c = W; c < sp; c += W) {
                const vw x = *(const vw *)(sh + c);
                mv = vsel(x > mv, x, mv);
            }
            float mb = m[h];
            for (int w = 0; w < W; ++w) mb = mv[w] > mb ? mv[w] : mb;
            vw sum = (vw){0};
            for (int64_t c = 0; c < sp; c += W) {
                vw e = vexp_nonpos(*(const vw *)(sh + c) - mb);
                e = vsel(lane + (int32_t)c < (vi){0} + (int32_t)n, e, (vw){0});
                *(vw *)(sh + c) = e;
                sum += e;
            }
            const float rescale = exp_nonpos(m[h] - mb);  /* the first block: exp(-inf) = 0 */
            l[h] = l[h] * rescale + hsum(sum);
            m[h] = mb;
            const float *vh = vblock + (h / g) * d;
            for (int64_t c0 = 0; c0 < nv; c0 += CH) {
                const int64_t cn = nv - c0 < CH ? nv - c0 : CH;
                vw a[CH];
                for (int64_t c = 0; c < cn; ++c) a[c] = acc[h * nv + c0 + c] * rescale;
                for (int64_t i = 0; i < n; ++i) {
                    if (c0 == 0) prefetch(&sv, vstep);
                    const vw *v = (const vw *)(vh + i * tok) + c0;
                    const float p = sh[i];
                    for (int64_t c = 0; c < cn; ++c) a[c] += p * v[c];
                }
                for (int64_t c = 0; c < cn; ++c) acc[h * nv + c0 + c] = a[c];
            }
        }
        prefetch(&sv, half_lines);
    }
    for (int64_t h = 0; h < heads; ++h) {
        const float inv = 1.0f / l[h];
        for (int64_t c = 0; c < nv; ++c) acc[h * nv + c] *= inv;
    }
    memcpy(ob, acc, sizeof(float) * (size_t)(heads * d));
}

#define CASE(NV) \
    if (nv == NV) { \
        job(g, NV, hkv, qb, cache, row, ctx, nrow, nctx, tok, half, bs, sp, scale, s, m, l, acc, ob); \
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
    const int64_t sp = (bs + W - 1) / W * W;  /* a head's block scores, padded to whole vectors */
    /* per thread: acc [heads][d], s [heads][sp], m and l [heads]; in 64-byte units (aligned_alloc) */
    const size_t floats = (size_t)((heads * d + heads * sp + 2 * heads + 15) / 16 * 16);
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        vw *acc = (vw *)aligned_alloc(64, sizeof(float) * floats);
        if (acc == NULL) {
            #pragma omp atomic write
            failed = 1;
        } else {
            float *s = (float *)(acc + heads * nv), *m = s + heads * sp, *l = m + heads;
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < batch; ++b) {
                const int64_t ctx = ctx_lens[b];
                const float *qb = q + b * q_row;  /* [heads][d] */
                const int32_t *row = table + b * t_row;
                /* the next row's blocks are prefetched while this one ends (the same thread's
                   next row under schedule(static) with one thread; a harmless guess with more) */
                const int32_t *nrow = b + 1 < batch ? row + t_row : 0;
                const int64_t nctx = b + 1 < batch ? ctx_lens[b + 1] : 0;
                float *ob = out + b * heads * d;
                CASE(2) CASE(4) CASE(8) CASE(16)
                job(g, nv, hkv, qb, cache, row, ctx, nrow, nctx, tok, half, bs, sp, scale, s, m, l, acc, ob);
            }
            free(acc);
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
