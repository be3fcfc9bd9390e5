"""``worker_svc.model.linear``: the packed oneDNN path gives F.linear's results, keeps MKL for a
few rows and under autograd, and notices a weight written in place or replaced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker_svc.model.linear import MIN_ROWS, Linear, PackedWeights, linear, uses_onednn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, 33, 512])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    layer = Linear(48, 80, bias=bias)
    x = torch.randn(rows, 48, generator=g)
    with torch.inference_mode():
        assert uses_onednn(x, layer.weight) == (rows >= MIN_ROWS)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_autograd_and_other_dtypes_keep_f_linear() -> None:
    layer = Linear(16, 8)
    x = torch.randn(32, 16, requires_grad=True)
    assert not uses_onednn(x, layer.weight)  # grad enabled: F.linear, differentiable
    layer(x).sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        assert not uses_onednn(torch.randn(32, 16, dtype=torch.float64), layer.weight.double())
        assert not uses_onednn(torch.randn(2, 32, 16), layer.weight)  # only [T, in] activations


def test_packed_weight_follows_in_place_writes_and_replacement() -> None:
    packed = PackedWeights()
    w = torch.randn(24, 16)
    x = torch.randn(8, 16)
    with torch.inference_mode():
        first = packed.get(w)
        assert packed.get(w) is first  # cached
    with torch.no_grad():
        w.mul_(2.0)  # a loader copying new values into the same tensor
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, None, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)
        other = torch.randn(24, 16)
        torch.testing.assert_close(linear(x, other, None, packed), F.linear(x, other), rtol=1e-5, atol=1e-5)
