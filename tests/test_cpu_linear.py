"""Which matmuls ``worker_svc.model.linear`` sends to oneDNN: a few rows over a small weight and
anything under autograd stay with F.linear; results match F.linear either way (the packed copy's
lifecycle is tested in ``test_model_forward_kernels``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker_svc.model.linear import MIN_ROWS, MIN_WEIGHT_ELEMENTS, linear, uses_onednn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, 33])
def test_few_rows_over_a_small_weight_stay_with_mkl(rows: int) -> None:
    small, large = torch.randn(80, 48), torch.randn(MIN_WEIGHT_ELEMENTS // 64, 64)
    with torch.inference_mode():
        x = torch.randn(rows, 48)
        assert uses_onednn(x, small) == (rows >= MIN_ROWS)
        torch.testing.assert_close(linear(x, small), F.linear(x, small), rtol=1e-5, atol=1e-5)
        y = torch.randn(rows, 64)
        assert uses_onednn(y, large)  # a large weight: oneDNN streams it faster even for one row
        torch.testing.assert_close(linear(y, large), F.linear(y, large), rtol=1e-4, atol=1e-4)


def test_autograd_other_dtypes_and_shapes_keep_f_linear() -> None:
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(32, 16, requires_grad=True)
    assert not uses_onednn(x, layer.weight)  # a differentiable call: F.linear
    linear(x, layer.weight, layer.bias).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.inference_mode():
        assert uses_onednn(torch.randn(32, 16), layer.weight)
        assert not uses_onednn(torch.randn(32, 16, dtype=torch.float64), layer.weight.double())
        assert not uses_onednn(torch.randn(2, 32, 16), layer.weight)  # only [T, in] activations
