"""The SwiGLU activation kernel (``worker_svc.model.cpu_silu``): silu(gate) * up of the fused
gate/up matmul's output, against a float64 reference and torch's two ops, over row counts, odd
widths (the scalar tail), saturated inputs and strided rows; the MLP's fused path takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker_svc.model import cpu_silu, llama
from worker_svc.model.config import ModelConfig

pytestmark = pytest.mark.skipif(cpu_silu.load() is None, reason="no C compiler: torch keeps the op")


@pytest.mark.parametrize("rows,inter", [(1, 768), (4, 19), (33, 64), (130, 40)])
def test_matches_float64_and_torch(rows: int, inter: int) -> None:
    torch.manual_seed(rows)
    gu = torch.randn(rows, 2 * inter + 6)[:, 3:3 + 2 * inter] * 8  # strided rows
    gu[0, :5] = torch.tensor([100.0, -100.0, 0.0, -88.0, 89.0])  # saturated exp either way
    got = cpu_silu.silu_mul(gu)
    assert got is not None and got.shape == (rows, inter) and got.is_contiguous()
    ref = F.silu(gu[:, :inter].double()) * gu[:, inter:].double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(got, F.silu(gu[:, :inter]) * gu[:, inter:], rtol=1e-6, atol=1e-7)


def test_declines_what_it_does_not_take() -> None:
    assert cpu_silu.silu_mul(torch.randn(2, 8, dtype=torch.float64)) is None
    assert cpu_silu.silu_mul(torch.randn(8, 4).t()) is None  # columns not contiguous
    assert cpu_silu.silu_mul(torch.randn(2, 7)) is None  # no halves


def test_the_mlp_takes_the_kernel_and_gives_the_plain_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    mlp = llama.MLP(ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                                max_position_embeddings=128))
    calls: list[tuple[int, int]] = []
    real = cpu_silu.silu_mul
    monkeypatch.setattr(cpu_silu, "silu_mul", lambda gu: calls.append(tuple(gu.shape)) or real(gu))
    x = torch.randn(3, 32)
    with torch.inference_mode():
        got = mlp(x)
    g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    want = F.linear(F.silu(F.linear(x, g.weight)) * F.linear(x, u.weight), d.weight)
    assert calls == [(3, 96)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
