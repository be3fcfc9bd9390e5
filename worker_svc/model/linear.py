"""Linear layers whose CPU matmuls go through oneDNN with a prepacked weight.

torch's default float32 matmul on CPU is MKL's sgemm. On the AMD EPYC cores of our benchmark
machine it runs at about 90 GFLOP/s per core, while oneDNN with the weight reordered once into its
blocked layout reaches about 220 GFLOP/s (`benchmarks/cpu_linear.py`; vLLM's CPU backend uses
oneDNN as well). Below ``MIN_ROWS`` rows (small-batch decodes) MKL's GEMV path is as fast or
faster, so those keep ``F.linear``. Elsewhere (CUDA, other dtypes, autograd) nothing changes.

The packed weight is cached on the module and rebuilt when the weight tensor is replaced or written
in place (its version moves), so loaders may keep assigning or copying into ``weight``. It is a
second copy of the weight in host memory: a CPU worker's weights take twice their size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PACKED_DTYPES = (torch.float32, torch.bfloat16)
_ONEDNN = torch.backends.mkldnn.is_available()
MIN_ROWS = 4  # fewer rows: MKL (measured by benchmarks/cpu_linear.py)


class PackedWeights:
    """oneDNN-packed copies of the weights one module multiplies by, keyed by the weight's identity."""

    def __init__(self) -> None:
        self._packed: dict[int, tuple[int, int, torch.Tensor]] = {}  # id(weight) -> (ptr, version, packed)

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        # an inference tensor has no version counter: only replacing it is noticed
        version = -1 if weight.is_inference() else weight._version
        key, ptr = id(weight), weight.data_ptr()
        entry = self._packed.get(key)
        if entry is None or entry[0] != ptr or entry[1] != version:
            with torch.inference_mode(False), torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)  # any batch size may use it
            entry = self._packed[key] = (ptr, version, packed)
        return entry[2]


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` goes through the packed oneDNN path (see the module docstring)."""
    return (_ONEDNN and x.device.type == "cpu" and x.dim() == 2 and x.shape[0] >= MIN_ROWS
            and x.dtype in _PACKED_DTYPES and weight.dtype == x.dtype
            and (torch.is_inference_mode_enabled() or not torch.is_grad_enabled()))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedWeights) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x [T, in] -> [T, out]."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed.get(weight), bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) with the packed CPU path."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs: object) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)  # type: ignore[arg-type]
        self.packed = PackedWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)
