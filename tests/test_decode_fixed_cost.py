"""The decode step's fixed-cost paths give what the paths they replace gave: RoPE rows from the
position table equal the direct computation bit for bit, the residual add fused into the next
layer's input norm leaves the logits unchanged, a steady batch's kept views stay the buffer's own
across block boundaries and buffer growth, and the CPU sampler's lists equal the device path's."""

from __future__ import annotations

import pytest
import torch

from common.types import KVGeometry, Placement, SamplingParams
from worker_svc.attention import AttentionBackend, AttentionMetadata
from worker_svc.kv.kv_cache import KVCache
from worker_svc.kv.manager import KVCacheManager
from worker_svc.kv.offload import CopyEngine
from worker_svc.kv.step_access import CopyStats, StepAccess
from worker_svc.kv.table_buffer import BlockTableBuffer
from worker_svc.model import cpu_norm
from worker_svc.model.config import ModelConfig
from worker_svc.model.linear import linear
from worker_svc.model.llama import LlamaForCausalLM, RotaryEmbedding
from worker_svc.sampling import sample


def _config(head_dim: int = 64, layers: int = 3, max_positions: int = 8192) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                       num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=head_dim,
                       max_position_embeddings=max_positions)


def test_rope_table_rows_equal_the_direct_computation_and_grow() -> None:
    for head_dim in (64, 128):
        rope = RotaryEmbedding(_config(head_dim))
        for dtype in (torch.float32, torch.bfloat16):
            for top in (5, 700, 1500, 5000):  # past the first table: it is rebuilt, doubled
                pos = torch.randint(0, top + 1, (17,))
                pos[0] = top
                cos, sin = rope(pos, dtype, top)
                want_cos, want_sin = rope._compute(pos, dtype)
                assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
                assert rope._table is not None and rope._table[2].shape[0] > top
        table = rope._table
        rope.reset(torch.device("cpu"))  # new frequencies: the table goes with the old ones
        assert rope._table is None
        rope(torch.tensor([3]), torch.float32, 3)
        assert rope._table is not table
    # A head dim whose half is not whole vectors, many tokens, or no maximum: computed directly.
    for rope, pos, top in ((RotaryEmbedding(_config(8)), torch.tensor([4]), 4),
                           (RotaryEmbedding(_config()), torch.arange(65), 64),
                           (RotaryEmbedding(_config()), torch.tensor([4]), None),
                           (RotaryEmbedding(_config(max_positions=16)), torch.tensor([4]), 16),
                           (RotaryEmbedding(_config(max_positions=1 << 20)), torch.tensor([4, 1 << 17]),
                            1 << 17)):  # past ROPE_TABLE_MAX_POSITIONS
        cos, sin = rope(pos, torch.float32, top)
        assert rope._table is None
        want = rope._compute(pos, torch.float32)
        assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])


class _FreshKV:
    """One fresh prompt of ``t`` tokens for every layer (the cache is written, never read)."""

    def __init__(self, t: int, heads_kv: int, head_dim: int) -> None:
        self.cache = torch.zeros((1, 2, t, heads_kv, head_dim))
        self.meta = AttentionMetadata(is_prefill=True, slot_blocks=torch.zeros(t, dtype=torch.int64),
                                      slot_offsets=torch.arange(t), seq_lens=[t],
                                      cu_seqlens=torch.tensor([0, t], dtype=torch.int32))

    def begin_layer(self, layer: int) -> tuple[torch.Tensor, AttentionMetadata]:
        return self.cache, self.meta

    def end_layer(self, layer: int) -> None:
        pass


def _unfused_forward(model: LlamaForCausalLM, ids: torch.Tensor, kv: _FreshKV,
                     backend: AttentionBackend) -> torch.Tensor:
    """The forward as it was: each layer adds its MLP output to x itself, RoPE computed directly."""
    m = model.model
    x = torch.nn.functional.embedding(ids, m.embed_tokens.weight)
    cos, sin = m.rotary_emb._compute(torch.arange(len(ids)), x.dtype)
    for layer in m.layers:
        attn = layer.self_attn.forward(layer.input_layernorm.forward(x), cos, sin, kv, backend)
        h = layer.post_attention_layernorm.add_forward(x, attn)
        x.add_(layer.mlp.forward(h))
    return linear(m.norm.forward(x[-1:]), model.lm_head.weight).float()


def test_residual_add_fused_into_the_next_norm_leaves_the_logits_unchanged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = _config()
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # norms that are not all ones
            layer.input_layernorm.weight.normal_()
            layer.post_attention_layernorm.weight.normal_()
    backend = AttentionBackend()
    ids = torch.randint(0, config.vocab_size, (9,))
    residual_calls: list[bool] = []
    real = cpu_norm.rms_norm

    def spy(x: torch.Tensor, w: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> torch.Tensor | None:
        residual_calls.append(residual is not None)
        return real(x, w, eps, residual)

    monkeypatch.setattr(cpu_norm, "rms_norm", spy)
    for enabled in (True, False):  # the C kernel, and torch's ops
        monkeypatch.setattr(cpu_norm, "ENABLED", enabled)
        residual_calls.clear()
        kv = _FreshKV(len(ids), config.num_kv_heads, config.head_dim)
        with torch.inference_mode():
            got = model(ids, torch.arange(len(ids)), torch.tensor([len(ids) - 1]), kv, backend, len(ids) - 1)
        # every layer's post-attention norm and every later layer's input norm take a residual
        assert sum(residual_calls) == 2 * config.num_layers - 1
        kv = _FreshKV(len(ids), config.num_kv_heads, config.head_dim)
        with torch.inference_mode():
            want = _unfused_forward(model, ids, kv, backend)
        assert torch.equal(got, want)


def test_steady_decode_views_are_kept_and_stay_the_buffers_own() -> None:
    """All-GPU decodes of one batch, step after step, across block boundaries and buffer growth
    (more columns: the ids tensor is replaced): each step's tables and slots equal the tables'
    lists, and between boundaries a step reuses the previous step's views."""
    layers, bs = 3, 4
    geo = KVGeometry(layers, 1, 2, bs, 4)
    mgr = KVCacheManager(geo, gpu_blocks=400, host_blocks=0, staging_blocks=0)
    kv = KVCache(geo, 400, 0, 0, torch.device("cpu"), torch.float32)
    buffer = BlockTableBuffer(layers, rows=4, blocks=2)
    tables = [mgr.allocate(f"r{i}", n, Placement.all_gpu(layers)) for i, n in enumerate((3, 6, 9))]
    assert all(t is not None for t in tables)
    lens = [3, 6, 9]
    reused = replaced = 0
    previous: StepAccess | None = None
    for _ in range(30):
        for i, t in enumerate(tables):
            if lens[i] + 1 > t.blocks_per_layer * bs:
                assert mgr.grow(t, lens[i] + 1)
        ids_before = buffer.ids
        access = StepAccess(tables, list(lens), [1, 1, 1], kv, mgr, CopyEngine(), CopyStats(), buffer)
        replaced += buffer.ids is not ids_before
        assert access.max_position == max(lens)  # the model's RoPE table reads it from the access
        if previous is not None and access._prebuilt is previous._prebuilt:
            reused += 1
        for layer in range(layers):
            _, meta = access.begin_layer(layer)
            want = [t.layers[layer].gpu_blocks[s // bs] for t, s in zip(tables, lens, strict=True)]
            assert meta.slot_blocks.tolist() == want
            assert meta.slot_offsets.tolist() == [s % bs for s in lens]
            assert meta.context_lens.tolist() == [s + 1 for s in lens]
            assert meta.cu_seqlens.tolist() == [0, 1, 2, 3]
            for i, t in enumerate(tables):
                n = -(-(lens[i] + 1) // bs)
                assert meta.block_table[i, :n].tolist() == t.layers[layer].gpu_blocks[:n]
            access.end_layer(layer)
        previous = access
        lens = [s + 1 for s in lens]
    assert reused > 10 and replaced > 0


def test_cpu_sampler_lists_equal_the_device_paths() -> None:
    """The CPU path's ids and log-probs are what the one-copy device path gives (ints and the
    float64 of each float32 log-prob)."""
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=1.0),
              SamplingParams(top_k=1), SamplingParams(temperature=0.5, top_p=0.8, seed=9)]
    got = sample(logits, params, [None] * 5, torch.Generator().manual_seed(1))
    chosen = torch.tensor([t.token_id for t in got])
    lp = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0]
    flat = torch.cat([chosen.double(), lp.double()]).tolist()
    assert [t.token_id for t in got] == [int(v) for v in flat[:5]]
    assert all(type(t.token_id) is int for t in got)
    assert [t.logprob for t in got] == flat[5:]
    assert got[0].token_id == int(logits[0].argmax()) and got[3].token_id == int(logits[3].argmax())

