"""Linear layers' CPU matmuls: oneDNN with float32 weights prepacked in its layout, or MKL's sgemm,
whichever this CPU runs faster for the call's rows and weight.

torch's float32 matmul on CPU is MKL's sgemm, whose code path on AMD CPUs stops at AVX2; oneDNN
picks its kernels from the CPU's flags (AVX-512 where present) and, on a weight reordered once into
its blocked layout, ran the projections of the bench models 2-2.4x faster from a few rows up on the
AVX-512 EPYC of our benchmarks (``benchmarks/cpu_linear.py``; vLLM's CPU path uses oneDNN too).
One row is faster through MKL only while the weight sits in cache (that benchmark); in a model the
weights of a decode step stream from memory, where oneDNN is faster at one row too (a batch-1 step
of the 7M-parameter bench model: 3.2-3.8 ms against 4.5-4.8 with MKL for 1-3 rows), so on AMD every
eligible matmul goes through oneDNN, one row included where the CPU has AVX-512 (without it one row
stays with MKL: ``ONE_ROW_ONEDNN``). On Intel CPUs with AVX-512 MKL takes its own AVX-512 path and
the balance turns (``MKL_NATIVE``): there MKL is faster for up to three rows, for weights under
1 MiB at any row count, and for prefills (``onednn_for``). Elsewhere (CUDA, other dtypes,
autograd) this is ``F.linear``.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F


def _onednn_usable() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_usable()

# One row on a CPU without AVX-512 stays with MKL: there oneDNN has only AVX2 kernels too, and its
# one-row call costs more than MKL's GEMV (an [1, 256] x [256, 768] matmul in cache: 47 against
# 25 us; a batch-1 decode step of the 7M bench model on a 2-core AVX2 EPYC: 6.7-6.8 against
# 8.1-8.8 ms, of the 51M one 22.8 against 24.9, alternating in one process). On AVX-512, oneDNN
# is faster at one row too (module docstring).
ONE_ROW_ONEDNN = "AVX512" in torch.backends.cpu.get_cpu_capability()


def _cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# Intel CPUs with AVX-512: MKL's sgemm runs its AVX-512 code there (on AMD it stops at AVX2), and
# float32 matmuls go to oneDNN only where it measured faster (``onednn_for``). On a 2-core Sapphire
# Rapids VM, one thread, weights in cache (``benchmarks/cpu_linear.py``): MKL's one- to three-row
# calls took 0.3-0.7x oneDNN's time (oneDNN's ~25-35 us fixed cost per call dominates them), and
# MKL stayed faster at every row count for the 7M bench model's 256-512 KB q/k/v and o weights
# (4-32 rows: 0.27-0.94x); from 4 rows on weights of 1 MiB and more (its fused gate/up, the LM
# head, every projection of the 51M model) oneDNN took 0.45-0.85x MKL's time up to 64 rows; from
# 128 rows both ran at 75-113 GFLOP/s, and prefill steps of the 7M model ran as fast or faster
# with MKL alone (1 x 128, 1 x 512, 4 x 100 tokens, the variants alternating in one process).
MKL_NATIVE = _cpu_vendor() == "GenuineIntel" and ONE_ROW_ONEDNN
MKL_MAX_ROWS = 3  # on MKL_NATIVE CPUs: calls of up to this many rows stay with MKL (its GEMV path)
ONEDNN_MIN_WEIGHT_BYTES = 1 << 20  # ... and so do smaller weights at any row count
ONEDNN_MAX_ROWS = 63  # ... and calls of more rows (prefill): MKL as fast or faster in the engine


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def onednn_for(rows: int, weight: torch.Tensor) -> bool:
    """Whether a ``rows``-row matmul by ``weight`` is faster through oneDNN than MKL on this CPU
    (for the eligible dtypes; see ``MKL_NATIVE`` and ``ONE_ROW_ONEDNN``). bfloat16 always: MKL
    has no bfloat16 sgemm, and oneDNN takes AMX where the CPU has it."""
    if weight.dtype != torch.float32:
        return True
    if MKL_NATIVE:
        return (MKL_MAX_ROWS < rows <= ONEDNN_MAX_ROWS
                and weight.numel() * 4 >= ONEDNN_MIN_WEIGHT_BYTES)
    return ONE_ROW_ONEDNN or rows > 1


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` goes through oneDNN (see the module docstring)."""
    # (``x.is_cpu`` rather than ``x.device.type``: no device object per call; this runs ~40 times
    # a decode step)
    return (_ONEDNN and x.is_cpu and x.dim() == 2 and x.dtype == weight.dtype
            and x.dtype in _ONEDNN_DTYPES and onednn_for(x.shape[0], weight)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


# float32 matmul weights are also kept in oneDNN's blocked layout (a second copy, made at first
# use), up to this many bytes in all: with weights streamed from memory, as in every decode step,
# a [32, hidden] batch ran 1.35x faster on the packed copy. Past the bound the plain weight is used,
# so a large model on the CPU does not double its weights' memory.
PREPACK_MAX_BYTES = 2 << 30
PACK_BATCH_HINT = 32  # the batch oneDNN lays the packed copy out for; it serves every batch size
_packed: dict[int, tuple[int, int, torch.Tensor]] = {}  # id(weight) -> (data_ptr, version, packed copy)
_packed_bytes = [0]
_pack_lock = threading.Lock()


def _forget(key: int, nbytes: int) -> None:
    if _packed.pop(key, None) is not None:
        _packed_bytes[0] -= nbytes


def _version(w: torch.Tensor) -> int:
    try:
        return w._version
    except RuntimeError:  # an inference tensor has no version counter; it cannot be written either
        return 0


def _packed_weight(w: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of ``w`` (made on first use, again after ``w`` is written or
    replaced), or ``w`` itself past ``PREPACK_MAX_BYTES``."""
    key = id(w)
    hit = _packed.get(key)
    if hit is not None and hit[0] == w.data_ptr() and hit[1] == _version(w):
        return hit[2]
    with _pack_lock:  # engines in several threads of one process share the cache
        return _pack(w, key)


def _pack(w: torch.Tensor, key: int) -> torch.Tensor:
    hit = _packed.get(key)
    if hit is not None and hit[0] == w.data_ptr() and hit[1] == _version(w):
        return hit[2]
    nbytes = w.numel() * w.element_size()
    if hit is not None:
        _packed_bytes[0] -= nbytes
        del _packed[key]
    elif _packed_bytes[0] + nbytes > PREPACK_MAX_BYTES:
        return w
    else:
        weakref.finalize(w, _forget, key, nbytes)
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_BATCH_HINT)
    _packed[key] = (w.data_ptr(), _version(w), packed)
    _packed_bytes[0] += nbytes
    return packed


# The op resolved once: ``torch.ops.mkldnn._linear_pointwise`` is two attribute lookups through
# torch.ops' namespaces and an overload dispatch per call (~1 us of a ~20 us one-row matmul).
_linear_pointwise: Any = torch.ops.mkldnn._linear_pointwise.default if _ONEDNN else None


def _onednn_weight(w: torch.Tensor) -> torch.Tensor:
    """The weight oneDNN multiplies by: its prepacked copy for a contiguous float32 one."""
    return _packed_weight(w) if w.dtype == torch.float32 and w.is_contiguous() else w


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for float32/bfloat16 on the CPU (what vLLM's CPU path uses too).

    Why: torch's CPU matmul calls MKL, whose code path on AMD CPUs stops at AVX2, while oneDNN
    picks its kernels from the CPU's flags (AVX-512 where present): 2-3x the float32 throughput of
    a [32, 576] x [576, 1728] matmul on an AVX-512 EPYC, and 1.3x at one row over that weight (a
    batch-1 decode: 24 GB/s of weights streamed against MKL's 16); float32 weights are prepacked
    (above).
    The sums are accumulated in another order, so results differ from F.linear in the last bits
    (relative ~1e-7); greedy ids and log-probs against transformers are checked by the tests.
    """
    if uses_onednn(x, weight):
        return _linear_pointwise(x if x.is_contiguous() else x.contiguous(), _onednn_weight(weight), bias,
                                 "none", [], "")
    return F.linear(x, weight, bias)



# Rows from which the MLP's SwiGLU runs its activation and product inside the gate and up matmuls
# (``swiglu``): a prefill's many rows. Fewer rows (decode) keep the plain ops.
FUSED_SWIGLU_MIN_ROWS = 64


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_bias: torch.Tensor | None = None,
           up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x @ gate.T + gate_bias) * (x @ up.T + up_bias)``, the MLP's input to its down matmul.

    Why: with many rows (a prefill) oneDNN applies silu as a post-op of the gate matmul and the
    product as a binary post-op of the up matmul, on each output tile while it is in registers,
    instead of two more passes over [rows, intermediate] tensors (what vLLM's compiled graph and
    its fused silu_and_mul kernel avoid too). oneDNN's silu rounds differently from torch's in the
    last bits (relative ~1e-6); greedy ids against transformers are checked by the tests.
    Otherwise (fewer rows, CUDA, other dtypes) the same formula with plain ops."""
    if (x.dim() == 2 and x.shape[0] >= FUSED_SWIGLU_MIN_ROWS and uses_onednn(x, gate)
            and uses_onednn(x, up)):
        x = x.contiguous()
        act = torch.ops.mkldnn._linear_pointwise(x, _onednn_weight(gate), gate_bias, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, act, _onednn_weight(up), up_bias, "mul")
    return F.silu(linear(x, gate, gate_bias)) * linear(x, up, up_bias)
