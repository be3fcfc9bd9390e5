"""RMSNorm on the CPU in float32 as one small C kernel, with the residual add before it fused in.

torch's CPU ``rms_norm`` is a composite of six ops (pow, mean, add, rsqrt, two muls), ~28 us for
one [1, 256] row or [32, 256] rows on the AVX2 bench machine, and a decode step of the 7M bench
model runs 17 of them: at batch 1 that is most of what the norms cost. This kernel does a row in
one pass (the residual add and the sum of squares), then the scaling, with the formula of HF's
float32 path (``w * (x * (1 / sqrt(mean(x^2) + eps)))``); only the sum's order differs (last-bit
differences, tested against it). Built by ``worker_svc.native``; where it cannot be built, or for
other dtypes, devices and layouts, ``rms_norm`` returns None and the caller keeps torch.
"""

from __future__ import annotations

import ctypes

import torch

from worker_svc import native

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* For each of rows rows of x [rows, dim] (row stride dim): with res, x += res first (in place);
   then out = w * (x * (1 / sqrt(mean(x^2) + eps))). res and out: [rows, dim] contiguous. */
void rms_norm(float *x, const float *res, const float *w, float *out, int64_t rows, int64_t dim,
              float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows >= 64)
    for (int64_t r = 0; r < rows; ++r) {
        float *xr = x + r * dim, *o = out + r * dim;
        float ss = 0.0f;
        if (res) {
            const float *d = res + r * dim;
            #pragma omp simd reduction(+:ss)
            for (int64_t i = 0; i < dim; ++i) {
                const float v = xr[i] + d[i];
                xr[i] = v;
                ss += v * v;
            }
        } else {
            #pragma omp simd reduction(+:ss)
            for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
        }
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        #pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] = w[i] * (xr[i] * inv);
    }
}
"""

ENABLED = True  # False: always torch (tests compare the two)


def _declare(handle: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    handle.rms_norm.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
    handle.rms_norm.restype = None


_KERNEL = native.Kernel("cpu_norm", _SOURCE, _declare)


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    return _KERNEL.load()


def _usable(t: torch.Tensor) -> bool:
    # (``is_cpu``, not ``device.type``: no device object per call; the norm runs ~17 times a step)
    return t.is_cpu and t.dtype == torch.float32 and t.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """RMSNorm of x [T, dim] (after ``x += residual`` in place, when given) into a new tensor, or
    None where the kernel does not apply (then nothing was written)."""
    if not (ENABLED and x.dim() == 2 and _usable(x) and _usable(weight) and weight.shape == x.shape[1:]):
        return None
    if residual is not None and (residual.shape != x.shape or not _usable(residual)):
        return None
    if (x.requires_grad or weight.requires_grad) and torch.is_grad_enabled():
        return None
    lib = _KERNEL.load()
    if lib is None:
        return None
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                 out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out
