"""SwiGLU's activation on the CPU in float32: ``silu(gate) * up`` from the fused gate/up matmul's
output, in one pass of a small C kernel.

The MLP's fused gate/up matmul gives [rows, 2 * intermediate] (gate in the first half of each row,
up in the second); torch needs two ops on its strided halves (``F.silu`` into a new tensor, then
``mul_``), two passes over [rows, intermediate] and ~6-10 us of dispatch each, where this kernel
reads both halves once and writes the product. silu(x) = x / (1 + exp(-x)) as torch computes it,
exp by Cephes' polynomial on whole vectors (about 1 ulp, as torch's own vectorised exp), so results
differ from torch's in the last bits only (tested). Built by ``worker_svc.native``; where it cannot
be built, or for other dtypes, devices and layouts, ``silu_mul`` returns None and the caller keeps
torch.
"""

from __future__ import annotations

import ctypes

import torch

from worker_svc import native

_SOURCE = native.SIMD_PRELUDE + r"""

/* exp(x) for any float x: clamped to the prelude's exp_in_range's range. */
static inline vw vexp(vw x) {
    const vw hi = (vw){0} + 88.7f, lo = (vw){0} - 87.33654f;
    x = (vw)(((vi)x & (vi)(x < hi)) | ((vi)hi & ~(vi)(x < hi)));
    x = (vw)(((vi)x & (vi)(x > lo)) | ((vi)lo & ~(vi)(x > lo)));
    return vexp_in_range(x);
}

static inline float sexp(float x) {
    return exp_in_range(x < 88.7f ? (x > -87.33654f ? x : -87.33654f) : 88.7f);
}

/* out[r, i] = g / (1 + exp(-g)) * u with g = gu[r, i], u = gu[r, inter + i], for rows rows of gu
   (row stride gu_row floats); out: [rows, inter] contiguous. */
void silu_mul(const float *gu, int64_t gu_row, float *out, int64_t rows, int64_t inter) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = gu + r * gu_row, *u = g + inter;
        float *o = out + r * inter;
        int64_t i = 0;
        for (; i + W <= inter; i += W) {
            const vw x = *(const vw *)(g + i);
            *(vw *)(o + i) = x / (1.0f + vexp(-x)) * *(const vw *)(u + i);
        }
        for (; i < inter; ++i) o[i] = g[i] / (1.0f + sexp(-g[i])) * u[i];
    }
}
"""

ENABLED = True  # False: always torch (tests compare the two)


def _declare(handle: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    handle.silu_mul.argtypes = [ptr, i64, ptr, i64, i64]
    handle.silu_mul.restype = None


_KERNEL = native.Kernel("cpu_silu", _SOURCE, _declare)


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call), or None where it cannot be built."""
    return _KERNEL.load()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate_up[:, :i]) * gate_up[:, i:]`` (i = half the columns) into a new [rows, i]
    tensor, or None where the kernel does not apply."""
    if not (ENABLED and gate_up.is_cpu and gate_up.dtype == torch.float32 and gate_up.dim() == 2
            and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0):
        return None
    if gate_up.requires_grad and torch.is_grad_enabled():
        return None
    lib = _KERNEL.load()
    if lib is None:
        return None
    rows, i = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, i), dtype=gate_up.dtype)
    lib.silu_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), rows, i)
    return out
