"""Which matmuls ``worker_svc.model.linear`` sends to oneDNN: on AMD (and any CPU that is not an
Intel one with AVX-512) every float32/bfloat16 [T, in] CPU matmul outside autograd, one row
included where the CPU has AVX-512 (else one row keeps MKL's F.linear); on an Intel CPU with
AVX-512 (``MKL_NATIVE``) float32 goes to oneDNN only from 4 to 63 rows over weights of 1 MiB or
more; anything under autograd, other dtypes and shapes stay with F.linear; results match F.linear
either way (the packed copy's lifecycle is tested in ``test_model_forward_kernels``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker_svc.model import linear as linear_mod
from worker_svc.model.linear import linear, uses_onednn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("one_row_onednn", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_every_row_count_goes_through_onednn_with_f_linears_results(
        rows: int, one_row_onednn: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_mod, "ONE_ROW_ONEDNN", one_row_onednn)
    monkeypatch.setattr(linear_mod, "MKL_NATIVE", False)
    weight, bias = torch.randn(80, 48), torch.randn(80)
    with torch.inference_mode():
        x = torch.randn(rows, 48)
        assert uses_onednn(x, weight) == (rows > 1 or one_row_onednn)
        torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        if not uses_onednn(x, weight):  # MKL's own result, bit for bit
            assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))


def test_one_row_follows_the_cpu() -> None:
    assert ("AVX512" in torch.backends.cpu.get_cpu_capability()) == linear_mod.ONE_ROW_ONEDNN
    intel = linear_mod._cpu_vendor() == "GenuineIntel"
    assert (intel and linear_mod.ONE_ROW_ONEDNN) == linear_mod.MKL_NATIVE


@pytest.mark.parametrize("rows", [1, 3, 4, 63, 64, 2048])
def test_intel_avx512_keeps_mkl_for_few_rows_small_weights_and_many_rows(
        rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With MKL_NATIVE, float32 takes oneDNN only for 4-63 rows over a weight of at least 1 MiB;
    MKL's result is F.linear's bit for bit, oneDNN's to rounding; bfloat16 always takes oneDNN."""
    monkeypatch.setattr(linear_mod, "MKL_NATIVE", True)
    small = torch.randn(512, 256)  # 512 KiB
    large = torch.randn(1024, 256)  # 1 MiB
    with torch.inference_mode():
        x = torch.randn(rows, 256)
        assert not uses_onednn(x, small)
        assert torch.equal(linear(x, small), F.linear(x, small))
        assert uses_onednn(x, large) == (4 <= rows <= 63)
        torch.testing.assert_close(linear(x, large), F.linear(x, large), rtol=1e-4, atol=1e-4)
        if not uses_onednn(x, large):
            assert torch.equal(linear(x, large), F.linear(x, large))
        assert uses_onednn(x.bfloat16(), small.bfloat16())


def test_autograd_other_dtypes_and_shapes_keep_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_mod, "MKL_NATIVE", False)  # the rule where every row count takes oneDNN
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(32, 16, requires_grad=True)
    assert not uses_onednn(x, layer.weight)  # a differentiable call: F.linear
    linear(x, layer.weight, layer.bias).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.inference_mode():
        assert uses_onednn(torch.randn(32, 16), layer.weight)
        assert not uses_onednn(torch.randn(32, 16, dtype=torch.float64), layer.weight.double())
        assert not uses_onednn(torch.randn(2, 32, 16), layer.weight)  # only [T, in] activations
