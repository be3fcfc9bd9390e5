"""Causal prefill attention on the CPU in float32: a blocked (flash-style) C kernel.

One kernel serves whole prompts (K/V read from the step's own projections) and prefill chunks after
earlier chunks (K/V read from the paged cache through the block table, the chunk's own K/V already
written there). Work is split per request and KV head: that head's K is packed once, transposed
into panels of keys, and its V into rows, so grouped-query attention reads each KV head once for all
its query heads (no K/V expanded per query head). The query rows of the group (token-major, each
token's g heads) go through in tiles; for each tile of keys up to the tile's last position, a
register-blocked micro-kernel computes the scores (6 rows x 2 vectors of keys on AVX2, 8 rows on
AVX-512, the queries broadcast), the online softmax rescales the running max, sum and output of
each row (exp2 by a polynomial, vectorised; the score scale and log2(e) folded into the packed
queries), and a second micro-kernel adds P V (the same rows x 2 vectors of the head dim). Tiles
wholly above the diagonal are skipped; only tiles crossing it are masked. Requests and KV heads
are spread over OpenMP threads.

Why: torch's CPU flash kernel ran 14-30 GFLOP/s on the bench shapes (a quarter to a third of a
512-token prefill of the small bench model), with GQA either expanded or mapped per head; this one
ran 1.2-2.7x faster per layer and a 512-token prefill step 1.15-1.22x (docs/benchmarks.md, stop 19).

The C source is built by ``worker_svc.native`` (cached per machine). Where it cannot be built,
``load()`` returns None and the backend keeps its torch path.
"""

from __future__ import annotations

import ctypes

import torch

from worker_svc import native

_SOURCE = native.SIMD_PRELUDE + r"""
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if W == 16
#define IOTA {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
#else
#define IOTA {0, 1, 2, 3, 4, 5, 6, 7}
#endif

/* Tile sizes. AVX-512 (32 vector registers): 8 query rows of a micro tile and 128-key tiles ran
   8-10 % faster than AVX2's 6 and 64 on a Sapphire Rapids core (1 x 512, 32 x 128 and 1 x 2048
   prompts, head dim 64, 4 query heads over 2: 82 / 47 / 94 GFLOP/s against 75 / 43 / 84). */
#if W == 16
#define MR 8            /* query rows of a micro tile */
#define KB 128          /* keys of a key tile (a multiple of PW) */
#else
#define MR 6
#define KB 64
#endif
#define PW (2 * W)      /* keys of a packed K panel (two vectors) */
#define QR 48           /* query rows of a query tile (a multiple of MR) */

/* 2^x for x <= 0: round-to-nearest split and Cephes' degree-6 polynomial of exp(r ln 2), arithmetic
   only so that the softmax loops vectorise; below -126 it gives 2^-126 (negligible against the
   row's max term, which is 1). */
static inline float exp2_nonpos(float x) {
    x = x < -126.0f ? -126.0f : x;
    const float n = (x + 12582912.0f) - 12582912.0f;   /* rint: 1.5 * 2^23 */
    const float r = (x - n) * 0.693147180559945f;
    const float p = EXP_POLY(float, r);
    union { int32_t i; float f; } scale = { .i = ((int32_t)n + 127) << 23 };
    return p * scale.f;
}

#if W == 16
#define VMAX(a, b) ((vw)_mm512_max_ps((__m512)(a), (__m512)(b)))
#else
#define VMAX(a, b) ((vw)_mm256_max_ps((__m256)(a), (__m256)(b)))
#endif

/* 2^x on W lanes (x <= 0; -inf gives 2^-126): the rounding constant's low bits are the integer
   part, shifted into the exponent without a conversion; exp's Cephes polynomial rewritten in r
   (the powers of ln 2 folded into its coefficients). 13 vector operations: with head dim 64 the
   softmax is as much work as a score and a P V product together, so every operation counts. */
static inline vw exp2v(vw x) {
    x = VMAX(x, (vw){0} - 126.0f);
    const vw t = x + 12582912.0f;                 /* 1.5 * 2^23: round to nearest */
    const vw r = x - (t - 12582912.0f);            /* in [-0.5, 0.5] */
    vw p = (vw){0} + 1.5279195033704184e-05f;
    p = p * r + 1.5506795114375121e-04f;
    p = p * r + 1.3333747867973944e-03f;
    p = p * r + 9.6179281027341230e-03f;
    p = p * r + 5.5504104642993860e-02f;
    p = p * r + 2.4022651272934140e-01f;
    p = p * r + 6.9314718055994530e-01f;
    p = p * r + 1.0f;
    const vi e = ((vi)t << 23) + (127 << 23);
    return p * (vw)e;
}

static inline float hmax(vw v) {
    float x = v[0];
    for (int i = 1; i < W; ++i) x = v[i] > x ? v[i] : x;
    return x;
}

static inline float hsum(vw v) {
    float x = 0.0f;
    for (int i = 0; i < W; ++i) x += v[i];
    return x;
}

/* s[r][0:kcols] = qp[r] . K[k0 + key] for MR rows (kcols a multiple of PW; kp: the tile's first
   panel), each row's max into mx[r]. diag: keys past a row's position pos[r] become -inf (the
   causal mask, and the padding past the tile's last key). */
static inline void scores(const float *qp, const float *kp, float *s, int64_t d, int64_t kcols,
                          int diag, const int64_t *pos, int64_t k0, float *mx) {
    const vi iota = IOTA;
    const vw ninf = (vw){0} - INFINITY;
    vw rmax[MR];
    for (int r = 0; r < MR; ++r) rmax[r] = ninf;
    for (int64_t j = 0; j < kcols; j += PW) {
        const float *panel = kp + (j / PW) * d * PW;
        vw a[MR][2];
        for (int r = 0; r < MR; ++r) { a[r][0] = (vw){0}; a[r][1] = (vw){0}; }
        for (int64_t c = 0; c < d; ++c) {
            const vw k0v = *(const vw *)(panel + c * PW), k1v = *(const vw *)(panel + c * PW + W);
            for (int r = 0; r < MR; ++r) {
                const float qs = qp[r * d + c];
                a[r][0] += qs * k0v;
                a[r][1] += qs * k1v;
            }
        }
        if (diag) {
            const vi key = iota + (int32_t)(k0 + j);
            for (int r = 0; r < MR; ++r) {
                const int32_t last = (int32_t)pos[r];
                const vi keep0 = key <= last, keep1 = (key + W) <= last;
                a[r][0] = (vw)(((vi)a[r][0] & keep0) | ((vi)ninf & ~keep0));
                a[r][1] = (vw)(((vi)a[r][1] & keep1) | ((vi)ninf & ~keep1));
            }
        }
        for (int r = 0; r < MR; ++r) {
            *(vw *)(s + r * KB + j) = a[r][0];
            *(vw *)(s + r * KB + j + W) = a[r][1];
            rmax[r] = VMAX(rmax[r], VMAX(a[r][0], a[r][1]));
        }
    }
    for (int r = 0; r < MR; ++r) mx[r] = hmax(rmax[r]);
}

/* One row of a key tile: sr[0:kcols] (scores in log2 units, masked ones -inf, max mx) becomes
   P = 2^(s - new max); *l is rescaled to the new max and P's sum added. Returns the new max. */
static inline float softmax_row(float *sr, int64_t kcols, float mx, float m_old, float *l) {
    const float mb = mx > m_old ? mx : m_old;
    vw sum = (vw){0};
    for (int64_t t = 0; t < kcols; t += W) {
        const vw p = exp2v(*(vw *)(sr + t) - mb);
        *(vw *)(sr + t) = p;
        sum += p;
    }
    const float alpha = m_old == -INFINITY ? 0.0f : (mb == m_old ? 1.0f : exp2_nonpos(m_old - mb));
    *l = *l * alpha + hsum(sum);
    return mb;
}

/* o[r] += sum_n p[r][n] vp[n] for MR rows over kn keys; NJ vectors of the head dim from c0. */
#define PV(NJ) \
    { \
        vw a[MR][NJ]; \
        for (int r = 0; r < MR; ++r) for (int j = 0; j < NJ; ++j) a[r][j] = *(vw *)(o + r * d + c0 + j * W); \
        for (int64_t n = 0; n < kn; ++n) { \
            vw v[NJ]; \
            for (int j = 0; j < NJ; ++j) v[j] = *(const vw *)(vp + n * d + c0 + j * W); \
            for (int r = 0; r < MR; ++r) { \
                const float pr = p[r * KB + n]; \
                for (int j = 0; j < NJ; ++j) a[r][j] += pr * v[j]; \
            } \
        } \
        for (int r = 0; r < MR; ++r) for (int j = 0; j < NJ; ++j) *(vw *)(o + r * d + c0 + j * W) = a[r][j]; \
    }

static inline void add_pv(const float *p, const float *vp, float *o, int64_t d, int64_t kn) {
    int64_t c0 = 0;
    for (; c0 + 2 * W <= d; c0 += 2 * W) PV(2)
    for (; c0 < d; c0 += W) PV(1)
}

/* out[t, h] = softmax(scale q[t, h] . K[:pos_t + 1, h / g]) V[:pos_t + 1, h / g] for every token t
   of every request b and query head h, causally (the queries of request b are the last n_b of its
   s_b positions).
   q: [T, heads, d], row stride q_row; out: [T, heads, d] contiguous; starts: [B + 1] int64 query
   offsets; keys: [B] int32 positions attended (s_b).
   cache == NULL (whole prompts, s_b == n_b): K and V of token t at k + t * k_row, v + t * v_row,
   head stride d. Otherwise the paged cache [N, 2, bs, hkv, d] (K at 0, V at 1) through table
   [B, *] int32 with row stride t_row. d must be a multiple of W. Returns nonzero when out of memory. */
int prefill_attention(const float *q, int64_t q_row, const float *k, int64_t k_row, const float *v,
                      int64_t v_row, const float *cache, const int32_t *table, int64_t t_row, int64_t bs,
                      const int64_t *starts, const int32_t *keys, float *out, int64_t batch, int64_t heads,
                      int64_t hkv, int64_t d, float scale, int threads) {
    const int64_t g = heads / hkv, tok = hkv * d, half = bs * tok;
    const float qscale = scale * 1.4426950408889634f;  /* scores in log2 units: exp2 below */
    int64_t smax = 0;
    for (int64_t b = 0; b < batch; ++b) smax = keys[b] > smax ? keys[b] : smax;
    const int64_t spad = (smax + KB - 1) / KB * KB;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        const size_t floats = (size_t)(2 * spad * d + 2 * QR * d + QR * KB + 3 * QR);
        float *ws = (float *)aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        if (ws == NULL) {
            #pragma omp atomic write
            failed = 1;
        } else {
            float *kp = ws, *vp = kp + spad * d, *qp = vp + spad * d, *o = qp + QR * d;
            float *s = o + QR * d, *m = s + QR * KB, *l = m + QR, *mx = l + QR;
            int64_t pos[QR];
            #pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < batch * hkv; ++item) {
                const int64_t b = item / hkv, kh = item % hkv;
                const int64_t q0 = starts[b], n = starts[b + 1] - q0, nk = keys[b], pos0 = nk - n;
                if (n <= 0) continue;
                const int64_t nkpad = (nk + KB - 1) / KB * KB;
                /* pack this KV head: K into panels [nkpad / PW][d][PW], V into rows [nk][d] */
                for (int64_t t = 0; t < nkpad; ++t) {
                    float *kdst = kp + (t / PW) * d * PW + t % PW;
                    if (t >= nk) {
                        for (int64_t c = 0; c < d; ++c) kdst[c * PW] = 0.0f;
                        continue;
                    }
                    const float *ks, *vs;
                    if (cache == NULL) {
                        ks = k + (q0 + t) * k_row + kh * d;
                        vs = v + (q0 + t) * v_row + kh * d;
                    } else {
                        ks = cache + (int64_t)table[b * t_row + t / bs] * 2 * half + (t % bs) * tok + kh * d;
                        vs = ks + half;
                    }
                    for (int64_t c = 0; c < d; ++c) kdst[c * PW] = ks[c];
                    memcpy(vp + t * d, vs, sizeof(float) * (size_t)d);
                }
                const int64_t rows = n * g;  /* row r: token r / g, head kh * g + r % g */
                for (int64_t r0 = 0; r0 < rows; r0 += QR) {
                    const int64_t rt = rows - r0 < QR ? rows - r0 : QR, rp = (rt + MR - 1) / MR * MR;
                    for (int64_t r = 0; r < rp; ++r) {
                        const int64_t rr = r0 + (r < rt ? r : rt - 1);
                        const int64_t t = rr / g, h = kh * g + rr % g;
                        pos[r] = pos0 + t;
                        const float *src = q + (q0 + t) * q_row + h * d;
                        for (int64_t c = 0; c < d; ++c) qp[r * d + c] = r < rt ? src[c] * qscale : 0.0f;
                        m[r] = -INFINITY;
                        l[r] = 0.0f;
                    }
                    memset(o, 0, sizeof(float) * (size_t)(rp * d));
                    const int64_t pmin = pos[0], pmax = pos[rt - 1];
                    for (int64_t k0 = 0; k0 <= pmax; k0 += KB) {
                        /* keys of this tile any row of the query tile sees (the diagonal tile: fewer) */
                        const int64_t kend = pmax + 1 < nk ? pmax + 1 : nk;
                        const int64_t kn = kend - k0 < KB ? kend - k0 : KB, kcols = (kn + PW - 1) / PW * PW;
                        const int diag = k0 + kcols - 1 > pmin;
                        for (int64_t r = 0; r < rp; r += MR)
                            scores(qp + r * d, kp + (k0 / PW) * d * PW, s + r * KB, d, kcols, diag, pos + r,
                                   k0, mx + r);
                        for (int64_t r = 0; r < rp; ++r) {
                            const float mb = softmax_row(s + r * KB, kcols, mx[r], m[r], &l[r]);
                            if (mb != m[r]) {  /* rescale the row's output to the new max */
                                const float alpha = m[r] == -INFINITY ? 0.0f : exp2_nonpos(m[r] - mb);
                                vw *orow = (vw *)(o + r * d);
                                for (int64_t c = 0; c < d / W; ++c) orow[c] *= alpha;
                                m[r] = mb;
                            }
                        }
                        for (int64_t r = 0; r < rp; r += MR)
                            add_pv(s + r * KB, vp + k0 * d, o + r * d, d, kn);
                    }
                    for (int64_t r = 0; r < rt; ++r) {
                        const int64_t rr = r0 + r, t = rr / g, h = kh * g + rr % g;
                        float *dst = out + ((q0 + t) * heads + h) * d;
                        const float inv = 1.0f / l[r];
                        for (int64_t c = 0; c < d; ++c) dst[c] = o[r * d + c] * inv;
                    }
                }
            }
            free(ws);
        }
    }
    return failed;
}
"""


def _declare(handle: ctypes.CDLL) -> None:
    fn = handle.prefill_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64,
                   ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int


KERNEL = native.Kernel("prefill_attention", _SOURCE, _declare)

# Head dims the kernel takes: a multiple of the widest vector it may be built with (16 floats).
HEAD_DIM_MULTIPLE = 16


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    return KERNEL.load()


def _rows_ok(x: torch.Tensor) -> bool:
    """[T, heads, D] float32 on the CPU with heads and elements contiguous (rows may be strided)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3 and x.stride(2) == 1
            and x.stride(1) == x.shape[2])


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``prompts`` takes these tensors."""
    return (_rows_ok(q) and _rows_ok(k) and _rows_ok(v) and q.shape[2] % HEAD_DIM_MULTIPLE == 0
            and q.shape[1] % k.shape[1] == 0)


def supports_cache(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether ``chunks`` takes these tensors."""
    return (_rows_ok(q) and cache.dtype == torch.float32 and cache.is_contiguous() and cache.dim() == 5
            and q.shape[2] % HEAD_DIM_MULTIPLE == 0 and q.shape[1] % cache.shape[3] == 0)


def _starts(seq_lens: list[int]) -> torch.Tensor:
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int64)


def _call(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
          cache: torch.Tensor | None, table: torch.Tensor | None, keys: torch.Tensor,
          seq_lens: list[int], hkv: int) -> torch.Tensor:
    t, h, d = q.shape
    out = torch.empty((t, h, d), dtype=q.dtype)
    starts = _starts(seq_lens)
    failed = lib.prefill_attention(
        q.data_ptr(), q.stride(0),
        k.data_ptr() if k is not None else None, k.stride(0) if k is not None else 0,
        v.data_ptr() if v is not None else None, v.stride(0) if v is not None else 0,
        cache.data_ptr() if cache is not None else None, table.data_ptr() if table is not None else None,
        table.stride(0) if table is not None else 0, cache.shape[2] if cache is not None else 0,
        starts.data_ptr(), keys.data_ptr(), out.data_ptr(), len(seq_lens), h, hkv, d, d ** -0.5,
        torch.get_num_threads())
    if failed:
        raise MemoryError("prefill attention kernel: out of memory for its workspace")
    return out


def prompts(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            seq_lens: list[int]) -> torch.Tensor:
    """Each packed prompt over itself, causally: q [T, H, D], k/v [T, Hkv, D] (rows may be strided;
    see ``supports``), seq_lens summing to T -> [T, H, D]."""
    keys = torch.tensor(seq_lens, dtype=torch.int32)
    return _call(lib, q, k, v, None, None, keys, seq_lens, k.shape[1])


def chunks(lib: ctypes.CDLL, q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
           context_lens: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Each request's ``seq_lens[b]`` new tokens (the last of its ``context_lens[b]`` positions,
    their K/V already in the cache) over its cached context, causally: q [T, H, D], cache
    [N, 2, bs, Hkv, D], block_table [B, M] int32 -> [T, H, D]."""
    table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    table = table if table.dtype == torch.int32 else table.to(torch.int32)
    keys = context_lens.to(torch.int32).contiguous()
    return _call(lib, q, None, None, cache, table, keys, seq_lens, cache.shape[3])
