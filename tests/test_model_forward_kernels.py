"""The model forward's faster pieces give exactly what HF's formulas give, and the fused q/k/v
weight stays the checkpoint's weights: views of it, rebuilt when a parameter is replaced."""

from __future__ import annotations

import pytest
import torch

from worker_svc.model import cpu_norm, llama
from worker_svc.model import linear as linear_module
from worker_svc.model.config import ModelConfig
from worker_svc.model.linear import linear
from worker_svc.model.llama import Attention, RMSNorm, RotaryEmbedding, apply_rotary


def _config(qkv_bias: bool = False) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                       max_position_embeddings=128, qkv_bias=qkv_bias)


def _hf_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for x [T, heads, D]."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def test_rope_with_signed_sin_is_bit_identical_to_hf() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(_config())
    positions = torch.tensor([0, 1, 7, 99, 127])
    x = torch.randn(5, 6, 8)
    cos, signed_sin = rope(positions, torch.float32)
    x_strided = torch.randn(5, 8, 8)[:, :6]  # a slice of the fused q/k/v output, as in the forward
    x_strided.copy_(x)
    assert torch.equal(apply_rotary(x_strided, cos, signed_sin), _hf_rope(x, positions, rope.inv_freq))
    long_pos = torch.arange(300) % 128  # a prefill's many tokens take the per-half path
    x = torch.randn(300, 6, 8)
    cos, signed_sin = rope(long_pos, torch.float32)
    wide = torch.randn(300, 8, 8)[:, :6]
    wide.copy_(x)
    assert torch.equal(apply_rotary(wide, cos, signed_sin), _hf_rope(x, long_pos, rope.inv_freq))


def test_rms_norm_is_bit_identical_to_hf_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's path (the CPU kernel of ``cpu_norm`` is checked against HF in test_cpu_norm)."""
    monkeypatch.setattr(cpu_norm, "ENABLED", False)
    torch.manual_seed(0)
    norm = RMSNorm(32, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(17, 32) * 3
    hf = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(norm(x), hf)


def test_fused_qkv_is_views_of_the_three_projections_and_follows_replacement() -> None:
    torch.manual_seed(0)
    attn = Attention(_config(qkv_bias=True), layer=0)
    w_q, w_k, b_v = attn.q_proj.weight.clone(), attn.k_proj.weight.clone(), attn.v_proj.bias.clone()
    fused_w, fused_b = attn.fused_qkv()
    assert fused_b is not None
    assert fused_w.shape == (4 * 8 + 2 * 2 * 8, 32)
    assert torch.equal(fused_w[:32], w_q) and torch.equal(fused_w[32:48], w_k)
    assert torch.equal(fused_b[48:], b_v)
    # the parameters are views: a copy into one (as a loader does) is seen by the fused matmul
    assert attn.q_proj.weight.data_ptr() == fused_w.data_ptr()
    with torch.no_grad():
        attn.k_proj.weight.fill_(0.5)
    assert torch.equal(attn.fused_qkv()[0][32:48], torch.full((16, 32), 0.5))
    # a parameter replaced by a new tensor: the fused weight is rebuilt from it
    state = {k: torch.full_like(v, 2.0) if k == "v_proj.weight" else v for k, v in attn.state_dict().items()}
    attn.load_state_dict(state, assign=True)
    rebuilt, _ = attn.fused_qkv()
    assert torch.equal(rebuilt[48:], torch.full((16, 32), 2.0))
    assert torch.equal(rebuilt[32:48], torch.full((16, 32), 0.5))
    assert attn.v_proj.weight.data_ptr() == rebuilt[48:].data_ptr()


def test_linear_matches_f_linear() -> None:
    """The oneDNN matmul agrees with F.linear to float32 rounding (one row and batches, with and
    without bias, strided input and weight)."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 40), torch.randn(96)
    for rows in (1, 2, 5, 33):
        x = torch.randn(rows, 80)[:, ::2]  # not contiguous, as a view of a wider tensor
        for bias in (None, b):
            got, want = linear(x, w, bias), torch.nn.functional.linear(x, w, bias)
            assert got.shape == want.shape == (rows, 96)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    wide = torch.randn(96, 80)[:, ::2]  # a strided weight
    x = torch.randn(3, 40)
    want = torch.nn.functional.linear(x, wide, b)
    torch.testing.assert_close(linear(x, wide, b), want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the forward's mode
        x = torch.randn(7, 40)
        torch.testing.assert_close(linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)


def test_packed_weights_follow_writes_and_replacement_and_respect_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed copy of a weight is rebuilt after an in-place write or a new tensor at the same
    parameter, and past PREPACK_MAX_BYTES the plain weight is used (same results either way)."""
    monkeypatch.setattr(linear_module, "MKL_NATIVE", False)  # this small weight through oneDNN anywhere
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 96, bias=False)
    x = torch.randn(4, 40)
    with torch.inference_mode():
        first = linear(x, lin.weight)
    torch.testing.assert_close(first, torch.nn.functional.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place: same storage, new version
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, lin.weight), 2 * first, rtol=1e-5, atol=1e-5)
    lin.weight = torch.nn.Parameter(torch.zeros(96, 40))  # replaced
    with torch.inference_mode():
        assert torch.count_nonzero(linear(x, lin.weight)) == 0
    bound = linear_module.PREPACK_MAX_BYTES
    try:
        linear_module.PREPACK_MAX_BYTES = 0
        w = torch.randn(96, 40)
        assert linear_module._packed_weight(w) is w  # over the bound: not packed
        torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    finally:
        linear_module.PREPACK_MAX_BYTES = bound


def test_mlp_in_row_chunks_matches_one_pass() -> None:
    """A CPU prefill longer than MLP_CHUNK_ROWS runs the MLP in chunks: same rows out (the last
    chunk partial), to float32 rounding."""
    torch.manual_seed(0)
    mlp = llama.MLP(_config())
    x = torch.randn(2 * llama.MLP_CHUNK_ROWS + 17, 32)
    with torch.inference_mode():
        got = mlp(x)
        want = mlp._swiglu(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_swiglu_with_post_ops_matches_the_plain_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """linear.swiglu (silu and the product as oneDNN post-ops from FUSED_SWIGLU_MIN_ROWS rows)
    gives silu(x g^T + bg) * (x u^T + bu) to float32 rounding, with and without biases, on a
    strided input, below and above the threshold; and the many-row case takes the fused call."""
    monkeypatch.setattr(linear_module, "MKL_NATIVE", False)  # these small weights through oneDNN anywhere
    torch.manual_seed(0)
    g, u = torch.randn(96, 40) * 0.2, torch.randn(96, 40) * 0.2
    bg, bu = torch.randn(96), torch.randn(96)
    threshold = linear_module.FUSED_SWIGLU_MIN_ROWS
    for rows in (1, threshold - 1, threshold, 300):
        x = torch.randn(rows, 80)[:, ::2]  # not contiguous
        for biases in ((None, None), (bg, bu)):
            want = (torch.nn.functional.silu(torch.nn.functional.linear(x, g, biases[0]))
                    * torch.nn.functional.linear(x, u, biases[1]))
            with torch.inference_mode():
                got = linear_module.swiglu(x, g, u, *biases)
            assert got.shape == want.shape == (rows, 96)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if linear_module.uses_onednn(torch.randn(threshold, 40), g):
        calls: list[str] = []
        real = torch.ops.mkldnn._linear_pointwise

        class Spy:
            def __call__(self, *args: object) -> torch.Tensor:
                calls.append(str(args[3]))
                return real(*args)

            def binary(self, *args: object) -> torch.Tensor:
                calls.append(str(args[4]))
                return real.binary(*args)

        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
        linear_module.swiglu(torch.randn(threshold, 40), g, u)
        assert calls == ["swish", "mul"]


def test_mlp_few_rows_take_one_fused_gate_up_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below FUSED_SWIGLU_MIN_ROWS (decode) gate and up are one matmul over a fused weight whose
    halves are the two parameters (views): silu(x g^T) * (x u^T) then down, to float32 rounding;
    a write into a parameter and a replaced parameter are both followed."""
    torch.manual_seed(0)
    mlp = llama.MLP(ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                                max_position_embeddings=128, mlp_bias=True))
    F = torch.nn.functional

    def plain(x: torch.Tensor) -> torch.Tensor:
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        act = F.silu(F.linear(x, g.weight, g.bias)) * F.linear(x, u.weight, u.bias)
        return F.linear(act, d.weight, d.bias)

    calls: list[int] = []
    real = llama.linear
    monkeypatch.setattr(llama, "linear", lambda x, w, b=None: calls.append(w.shape[0]) or real(x, w, b))
    for rows in (1, 4, linear_module.FUSED_SWIGLU_MIN_ROWS - 1):
        x = torch.randn(rows, 32)
        calls.clear()
        with torch.inference_mode():
            got = mlp(x)
        assert calls == [128, 32]  # one [2 * intermediate] matmul, then down
        torch.testing.assert_close(got, plain(x), rtol=1e-5, atol=1e-5)
    fused_w, fused_b = mlp._gate_up.get()
    assert mlp.up_proj.weight.data_ptr() == fused_w[64:].data_ptr()
    assert fused_b is not None and mlp.gate_proj.bias.data_ptr() == fused_b.data_ptr()
    x = torch.randn(3, 32)
    with torch.no_grad():
        mlp.up_proj.weight.mul_(2.0)  # in place, as a loader's copy_: seen by the fused matmul
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), plain(x), rtol=1e-5, atol=1e-5)
    state = {k: torch.randn_like(v) if k == "gate_proj.weight" else v for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(state, assign=True)  # replaced: the fused weight is rebuilt from it
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), plain(x), rtol=1e-5, atol=1e-5)
    assert mlp.gate_proj.weight.data_ptr() == mlp._gate_up.get()[0].data_ptr()


@pytest.mark.parametrize("mkl_native", [True, False])
def test_mlp_many_rows_take_post_ops_through_onednn_else_the_fused_matmul(
        mkl_native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """From FUSED_SWIGLU_MIN_ROWS rows the MLP takes ``swiglu``'s oneDNN post-ops where oneDNN
    takes its gate and up weights, and otherwise (an Intel CPU's MKL path for small weights) the
    one fused [2 * intermediate] matmul; both give the plain formula to float32 rounding."""
    if not linear_module._ONEDNN and not mkl_native:
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(linear_module, "MKL_NATIVE", mkl_native)
    torch.manual_seed(0)
    mlp = llama.MLP(ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                                max_position_embeddings=128, mlp_bias=True))
    F = torch.nn.functional
    swiglu_calls: list[int] = []
    real_swiglu = llama.swiglu
    monkeypatch.setattr(llama, "swiglu", lambda x, *a: swiglu_calls.append(x.shape[0]) or real_swiglu(x, *a))
    calls: list[int] = []
    real = llama.linear
    monkeypatch.setattr(llama, "linear", lambda x, w, b=None: calls.append(w.shape[0]) or real(x, w, b))
    x = torch.randn(linear_module.FUSED_SWIGLU_MIN_ROWS + 5, 32)
    with torch.inference_mode():
        got = mlp(x)
    g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    want = F.linear(F.silu(F.linear(x, g.weight, g.bias)) * F.linear(x, u.weight, u.bias), d.weight, d.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if mkl_native:  # these small weights stay with MKL: one fused matmul, then down
        assert (swiglu_calls, calls) == ([], [128, 32])
    else:
        assert (swiglu_calls, calls) == ([x.shape[0]], [32])


def test_fused_qkv_matmul_sees_an_in_place_write_after_first_use() -> None:
    """A parameter written in place after the fused weight was used (and packed for oneDNN) is
    seen by the next fused matmul: the packed copy is not left stale."""
    torch.manual_seed(0)
    attn = Attention(_config(), layer=0)
    x = torch.randn(2, 32)
    with torch.inference_mode():
        linear(x, *attn.fused_qkv())
    with torch.no_grad():
        attn.q_proj.weight.fill_(0.25)
    with torch.inference_mode():
        got = linear(x, *attn.fused_qkv())
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    want = torch.nn.functional.linear(x, qkv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_rows_work_on_parameters_made_in_inference_mode() -> None:
    """A model built under inference_mode has inference-tensor parameters (no version counter):
    the fused weights are still built and reused, with the same results."""
    torch.manual_seed(0)
    with torch.inference_mode():
        attn = Attention(_config(), layer=0)
        x = torch.randn(2, 32)
        first = attn.fused_qkv()[0]
        assert attn.fused_qkv()[0] is first  # built once, then reused
        want = torch.nn.functional.linear(x, torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                                        attn.v_proj.weight]))
        torch.testing.assert_close(linear(x, first), want, rtol=1e-5, atol=1e-5)
