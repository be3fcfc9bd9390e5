"""The CPU RMSNorm kernel gives HF's float32 RMSNorm (to the last bits of a sum's order), with and
without the fused residual add, and declines what it does not take (the caller keeps torch)."""

from __future__ import annotations

import pytest
import torch

from worker_svc.model import cpu_norm
from worker_svc.model.llama import RMSNorm

pytestmark = pytest.mark.skipif(cpu_norm.load() is None, reason="no C compiler to build the kernel")


def _hf(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize(("rows", "dim"), [(1, 256), (32, 576), (300, 40), (3, 7)])
def test_kernel_matches_hf(rows: int, dim: int) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(rows, dim) * 3, torch.randn(dim)
    got = cpu_norm.rms_norm(x, w, 1e-6)
    assert got is not None
    torch.testing.assert_close(got, _hf(x, w, 1e-6), rtol=2e-6, atol=1e-6)


def test_residual_is_added_in_place_first() -> None:
    torch.manual_seed(1)
    x, d, w = torch.randn(5, 64), torch.randn(5, 64), torch.randn(64)
    want_x = x + d
    got = cpu_norm.rms_norm(x, w, 1e-5, residual=d)
    assert got is not None
    assert torch.equal(x, want_x)  # the add is float32's own: exact
    torch.testing.assert_close(got, _hf(want_x, w, 1e-5), rtol=2e-6, atol=1e-6)


def test_declines_what_it_does_not_take() -> None:
    w = torch.randn(32)
    assert cpu_norm.rms_norm(torch.randn(4, 64)[:, ::2], w, 1e-6) is None  # strided
    assert cpu_norm.rms_norm(torch.randn(4, 32, dtype=torch.float64), w.double(), 1e-6) is None
    assert cpu_norm.rms_norm(torch.randn(2, 4, 32), w, 1e-6) is None  # only [T, dim]
    assert cpu_norm.rms_norm(torch.randn(4, 32, requires_grad=True), w, 1e-6) is None  # autograd
    x = torch.randn(4, 32)
    before = x.clone()
    assert cpu_norm.rms_norm(x, w, 1e-6, residual=torch.randn(4, 64)[:, ::2]) is None
    assert torch.equal(x, before)  # declined: nothing written


def test_module_uses_the_kernel_and_torch_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, d = torch.randn(9, 48), torch.randn(9, 48)
    with torch.inference_mode():
        fast, fast_add = norm(x), norm.add_forward(x.clone(), d)
        monkeypatch.setattr(cpu_norm, "ENABLED", False)
        slow, slow_add = norm(x), norm.add_forward(x.clone(), d)
    torch.testing.assert_close(fast, slow, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(fast_add, slow_add, rtol=2e-6, atol=1e-6)
