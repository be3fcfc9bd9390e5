"""Decode attention read in place from the paged KV cache on the CPU: a small C kernel.

A decode step of the SDPA backend copies every row's K/V blocks into a workspace and then runs
SDPA over it: three passes over the context's bytes (read, write, read again) where attention
needs one, and on the CPU that traffic is most of its cost. This kernel walks each row's block
table and reads K and V where they lie, one row at a time with all its query heads (grouped-query
attention without expanding K/V): scores, an exact softmax (max, then exp and sum), then the
weighted sum of V, all in float32.

The C source below is compiled with the system C compiler (``cc -O3 -march=native``, a few
seconds) into a shared library kept in the user's cache folder (one per source, compiler and CPU)
and loaded with ctypes; torch tensors are passed as pointers and strides. Where no compiler is
found or the build fails, ``load()`` returns None and the backend keeps its torch path (logged once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16 floats; aligned(4): loads and stores may be unaligned. The compiler lowers it to the
   machine's widest vectors (AVX-512, or pairs/quads of narrower ones). */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

static inline float hsum(v16 v) {  /* a tree: a chain of 16 scalar adds would bound the kernel */
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* The K (part 0) or V (part half) half of the row's next block, or 0 after its last. */
static inline const char *next_block(const float *cache, const int32_t *row, int64_t blk,
                                     int64_t nblocks, int64_t half, int64_t part) {
    return blk + 1 < nblocks ? (const char *)(cache + (int64_t)row[blk + 1] * 2 * half + part) : 0;
}

/* Prefetch token i of that block (tok floats: every KV head of one token). */
static inline void prefetch_token(const char *next, int64_t i, int64_t tok) {
    if (!next) return;
    for (int64_t line = 0; line < tok * 4; line += 64) __builtin_prefetch(next + i * tok * 4 + line);
}

/* One row's job: every query head over the row's context. Each token's K (and V) of all KV heads is
   one contiguous run of hkv * d floats, read once, front to back; the next block is prefetched
   while this one is computed (a row's blocks are anywhere in the cache, so the hardware prefetcher
   cannot guess the jump, and a decode's K/V come from memory: the weights streamed through the
   caches since the last step evicted them). Inlined into callers with constant g and nv, so the
   loops over them unroll. s: [heads][max_ctx] scores; acc: [heads][nv] accumulators. */
static inline __attribute__((always_inline)) void job(
        const int64_t g, const int64_t nv, const int64_t hkv, const v16 *qb, const float *cache,
        const int32_t *row, int64_t ctx, int64_t tok, int64_t half, int64_t bs, int64_t max_ctx,
        float scale, float *s, v16 *acc, float *ob) {
    const int64_t heads = g * hkv, nblocks = (ctx + bs - 1) / bs;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t t0 = blk * bs, n = ctx - t0 < bs ? ctx - t0 : bs;
        const float *kblock = cache + (int64_t)row[blk] * 2 * half;
        const char *next = next_block(cache, row, blk, nblocks, half, 0);
        for (int64_t i = 0; i < n; ++i) {
            prefetch_token(next, i, tok);
            const float *kt = kblock + i * tok;
            for (int64_t kh = 0; kh < hkv; ++kh) {
                const v16 *k = (const v16 *)(kt + kh * nv * 16);
                for (int64_t j = 0; j < g; ++j) {
                    const int64_t h = kh * g + j;
                    v16 a = qb[h * nv] * k[0];
                    for (int64_t c = 1; c < nv; ++c) a += qb[h * nv + c] * k[c];
                    s[h * max_ctx + t0 + i] = hsum(a) * scale;
                }
            }
        }
    }
    for (int64_t h = 0; h < heads; ++h) {
        float *sh = s + h * max_ctx;
        float m = -INFINITY, sum = 0.0f;
        #pragma omp simd reduction(max:m)
        for (int64_t t = 0; t < ctx; ++t) m = sh[t] > m ? sh[t] : m;
        #pragma omp simd
        for (int64_t t = 0; t < ctx; ++t) sh[t] = expf(sh[t] - m);
        #pragma omp simd reduction(+:sum)
        for (int64_t t = 0; t < ctx; ++t) sum += sh[t];
        const float inv = 1.0f / sum;
        #pragma omp simd
        for (int64_t t = 0; t < ctx; ++t) sh[t] *= inv;
    }
    for (int64_t x = 0; x < heads * nv; ++x) acc[x] = (v16){0};
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t t0 = blk * bs, n = ctx - t0 < bs ? ctx - t0 : bs;
        const float *vblock = cache + (int64_t)row[blk] * 2 * half + half;
        const char *next = next_block(cache, row, blk, nblocks, half, half);
        for (int64_t i = 0; i < n; ++i) {
            prefetch_token(next, i, tok);
            const float *vt = vblock + i * tok;
            for (int64_t kh = 0; kh < hkv; ++kh) {
                const v16 *v = (const v16 *)(vt + kh * nv * 16);
                for (int64_t j = 0; j < g; ++j) {
                    const int64_t h = kh * g + j;
                    const float p = s[h * max_ctx + t0 + i];
                    for (int64_t c = 0; c < nv; ++c) acc[h * nv + c] += p * v[c];
                }
            }
        }
    }
    memcpy(ob, acc, sizeof(float) * (size_t)(heads * nv * 16));
}

#define CASE(G, NV) \
    if (g == G && nv == NV) { \
        job(G, NV, hkv, qb, cache, row, ctx, tok, half, bs, max_ctx, scale, s, acc, ob); \
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
    const int64_t g = heads / hkv, nv = d / 16;
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
            v16 *acc = (v16 *)(s + heads * max_ctx);
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < batch; ++b) {
                const int64_t ctx = ctx_lens[b];
                const v16 *qb = (const v16 *)(q + b * q_row);  /* [heads][nv] */
                const int32_t *row = table + b * t_row;
                float *ob = out + b * heads * d;
                CASE(1, 4) CASE(2, 4) CASE(3, 4) CASE(4, 4) CASE(5, 4) CASE(6, 4) CASE(7, 4) CASE(8, 4)
                CASE(1, 8) CASE(2, 8) CASE(3, 8) CASE(4, 8) CASE(5, 8) CASE(6, 8) CASE(7, 8) CASE(8, 8)
                job(g, nv, hkv, qb, cache, row, ctx, tok, half, bs, max_ctx, scale, s, acc, ob);
            }
            free(s);
        }
    }
    return failed;
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")


def _cache_dir() -> str:
    """Where built libraries are kept between processes (the user's cache folder)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "layerkv", "paged-decode")


def _build_key(cc: str) -> str:
    """The source, flags, compiler and CPU (-march=native code runs only where it was built: a
    cache folder shared by machines with other CPUs gets another library)."""
    h = hashlib.sha256()
    for part in (_SOURCE, " ".join(_FLAGS), cc, platform.machine()):
        h.update(part.encode())
    try:
        h.update(subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout)
        with open("/proc/cpuinfo", "rb") as f:  # Linux: the CPU's model and instruction flags
            h.update(b"".join(line for line in f if line.startswith((b"flags", b"model name")))[:4096])
    except (OSError, subprocess.SubprocessError):
        pass
    return h.hexdigest()[:24]


def _compile(cc: str, folder: str) -> str:
    """Compile into ``folder``; the library's path."""
    src, lib = os.path.join(folder, "paged_decode.c"), os.path.join(folder, "paged_decode.so")
    with open(src, "w") as f:
        f.write(_SOURCE)
    subprocess.run([cc, *_FLAGS, src, "-o", lib, "-lm"], check=True, capture_output=True, timeout=120)
    return lib


def _build() -> ctypes.CDLL | None:
    """Load the library from the cache folder, compiling it there first when missing (a few
    seconds once per machine; written under a temporary name and renamed, so concurrent
    processes never load a half-written file). An unwritable cache: built in a temporary folder."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found: decode attention keeps the torch path")
        return None
    try:
        cached = os.path.join(_cache_dir(), f"paged_decode-{_build_key(cc)}.so")
        if not os.path.isfile(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            folder = tempfile.mkdtemp(prefix="build-", dir=os.path.dirname(cached))
            try:
                os.replace(_compile(cc, folder), cached)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        handle = ctypes.CDLL(cached)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("no cached paged decode kernel (%s): building it in a temporary folder", exc)
        folder = tempfile.mkdtemp(prefix="layerkv-paged-decode-")
        try:
            handle = ctypes.CDLL(_compile(cc, folder))
        except (OSError, subprocess.SubprocessError) as exc2:
            log.warning("building the paged decode kernel failed (%s): decode attention keeps the torch "
                        "path", exc2)
            return None
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the loaded library stays mapped
    fn = handle.paged_decode
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64,
                   ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return handle


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            _lib = _build()
    return _lib


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
