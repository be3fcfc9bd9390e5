"""One readable Llama-family model (Llama 2/3, Qwen2, Mistral) that reads and writes a paged KV cache.

The model never knows where a layer's KV lives: before each layer it asks the ``LayerKVAccess`` for
that layer's cache tensor and attention metadata (which may wait for a host-to-device load), and
tells it when the layer is done (which may start a device-to-host copy). Parameter names follow
HuggingFace so checkpoints load without renaming. Shapes: T tokens in the step, B requests,
H query heads, Hkv KV heads, D head dim.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from worker_svc.attention import AttentionBackend, AttentionMetadata
from worker_svc.model import cpu_norm, cpu_rope, cpu_silu
from worker_svc.model.config import ModelConfig
from worker_svc.model.linear import FUSED_SWIGLU_MIN_ROWS, linear, swiglu, uses_onednn


class LayerKVAccess(Protocol):
    """What the model needs from the KV cache for one step."""

    def begin_layer(self, layer: int) -> tuple[torch.Tensor, AttentionMetadata]:
        """The GPU-tier KV tensor [N, 2, block_size, Hkv, D] and this layer's metadata, ready to use."""
        ...

    def end_layer(self, layer: int) -> None:
        """This layer's KV has been written (and read): start any copy that follows it."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (``_parameters``, not ``self.weight``: nn.Module's attribute lookup, ~1 us, 17 norms a step)
        w = self._parameters["weight"]
        assert w is not None
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            # CPU: one C kernel (cpu_norm); elsewhere torch's, bit-identical to HF's formula (tested).
            out = cpu_norm.rms_norm(x, w, self.eps)
            return out if out is not None else F.rms_norm(x, w.shape, w, self.eps)
        # Half dtypes: normalise in float32 as HF does, then scale in the model dtype.
        return w * F.rms_norm(x.float(), w.shape, None, self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``x += residual`` in place, then the norm of x: one pass of the CPU kernel."""
        w = self._parameters["weight"]
        assert w is not None
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            out = cpu_norm.rms_norm(x, w, self.eps, residual)
            if out is not None:
                return out
        return self.forward(x.add_(residual))


ROPE_TABLE_MAX_TOKENS = 64  # steps of at most this many tokens (decodes) read cos/sin from a table
ROPE_TABLE_CHUNK = 32768  # table elements computed per op (torch's grain: one chunk is never split)
# Positions past this are computed directly: the table stays within 64 MB (head dim 128, float32).
ROPE_TABLE_MAX_POSITIONS = 1 << 16


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for given positions (plain or Llama-3 scaled frequencies)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self._inv_freq(torch.device("cpu")), persistent=False)  # [D/2]
        # cos and signed sin of positions 0..n-1, [n, 2, D] (built on first use, grown by doubling)
        self._table: tuple[torch.Tensor, torch.dtype, torch.Tensor] | None = None  # (inv_freq, dtype, table)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        dim = self.config.head_dim
        exps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        inv_freq = 1.0 / (self.config.rope_theta ** exps)
        if self.config.rope_scaling is not None:
            inv_freq = _llama3_scale(inv_freq, self.config)
        return inv_freq

    def reset(self, device: torch.device) -> None:
        """Recompute the table (after building the model on the meta device), in float32."""
        self.inv_freq = self._inv_freq(device)
        self._table = None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [T, D] and the *signed* sin [T, D] (first half negated) that ``apply_rotary`` takes.

        With ``max_position`` (the largest of ``positions``, known to the caller without reading the
        tensor) a step of few tokens (a decode) takes its rows from a table of every position up
        to it: one gather instead of nine small ops. The table holds what ``_compute`` gives for
        those positions, bit for bit: its elements go through the same elementwise kernels, in
        chunks that torch never splits between threads, each row a whole number of vectors (so no
        element takes a kernel's scalar tail; other head dims keep ``_compute``)."""
        if (max_position is not None and positions.shape[0] <= ROPE_TABLE_MAX_TOKENS
                and max_position < min(self.config.max_position_embeddings, ROPE_TABLE_MAX_POSITIONS)
                and (self.config.head_dim // 2) % 32 == 0):
            table = self._table_to(max_position, dtype)
            rows = table.index_select(0, positions)  # [T, 2, D]
            return rows[:, 0], rows[:, 1]
        return self._compute(positions, dtype)

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, D/2]
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def _table_to(self, max_position: int, dtype: torch.dtype) -> torch.Tensor:
        """The table [n, 2, D] of positions 0..n-1 with n > max_position (rebuilt, doubled, when short)."""
        cached = self._table
        if (cached is not None and cached[0] is self.inv_freq and cached[1] == dtype
                and cached[2].shape[0] > max_position):
            return cached[2]
        n = min(self.config.max_position_embeddings, ROPE_TABLE_MAX_POSITIONS,
                max(1024, 1 << max_position.bit_length()))
        d = self.config.head_dim
        table = torch.empty((n, 2, d), dtype=dtype, device=self.inv_freq.device)
        step = max(1, ROPE_TABLE_CHUNK // (d // 2))  # rows per chunk
        for start in range(0, n, step):
            pos = torch.arange(start, min(n, start + step), device=self.inv_freq.device)
            cos, sin = self._compute(pos, dtype)
            table[start:start + len(pos), 0] = cos
            table[start:start + len(pos), 1] = sin
        self._table = (self.inv_freq, dtype, table)
        return table


def _llama3_scale(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    s = config.rope_scaling
    assert s is not None
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [T, heads, D] with cos/signed_sin [T, D] from ``RotaryEmbedding``, into a new
    contiguous tensor.

    HF's ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = (-x2, x1), written per half:
    (x1 * c - x2 * s, x2 * c + x1 * s) with c, s the first and second halves of the tables, since
    a + (-x2) * s == a - x2 * s exactly. Bit-identical to HF (tested), with no concatenation or
    roll and half-size passes straight into the output: half the time of a roll-based version at
    4096 tokens. A few tokens (decode) take the roll: fewer, smaller ops (also bit-identical).
    """
    h = x.shape[-1] // 2
    if x.shape[0] < 64:
        rolled = x.roll(h, dims=-1).mul_(signed_sin[:, None, :])  # (x2, x1) * (-s, s)
        return (x * cos[:, None, :]).add_(rolled)
    c, s = cos[:, None, :h], signed_sin[:, None, h:]  # [T, 1, D/2]: cos and +sin of each frequency
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :h], out[..., h:]
    t = torch.mul(x2, s)
    torch.mul(x1, c, out=o1).sub_(t)
    torch.mul(x1, s, out=t)
    torch.mul(x2, c, out=o2).add_(t)
    return out


def _version(w: torch.Tensor) -> int:
    try:
        return w._version
    except RuntimeError:  # an inference tensor has no version counter; it cannot be written either
        return 0


class FusedRows:
    """Several ``nn.Linear`` of one input as one [sum of out_features, in] weight (and bias), so
    they take one matmul (q/k/v; gate/up of a decode's few rows).

    Built on first use after loading, and the parameters become views into it, so memory stays
    the same and the HF names (state_dict, loaders, copy_ into a weight) keep working. A parameter
    replaced since (``load_state_dict(assign=True)``, ``.data =``, ``.to()``) is noticed and the
    fused tensor rebuilt; so is one written in place (a loader's ``copy_``): the parameter has a
    version counter of its own, not the fused tensor's, and without the rebuild ``linear``'s packed
    copy of the fused tensor would stay stale. The check runs every call, so it is kept to an
    identity, an address and a version per projection (the module attribute lookups of
    ``p.weight`` alone cost more than the whole check).
    """

    def __init__(self, projs: tuple[nn.Linear, ...]) -> None:
        self.projs = projs
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._views: tuple[tuple[dict[str, nn.Parameter | None], torch.Tensor, int, int], ...] = ()

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight
        for params, weight, address, version in self._views:
            if params["weight"] is not weight or weight.data_ptr() != address or _version(weight) != version:
                break
        else:
            if w is not None:
                return w, self.bias
        return self._build()

    def _build(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        projs = self.projs
        with torch.inference_mode(False), torch.no_grad():  # real tensors, usable outside inference
            self.weight = w = torch.cat([p.weight for p in projs])
            biases: list[torch.Tensor] = [p.bias for p in projs if p.bias is not None]
            self.bias = torch.cat(biases) if len(biases) == len(projs) else None
            start = 0
            for p in projs:
                n = p.weight.shape[0]
                p.weight.data = w[start:start + n]
                if self.bias is not None and p.bias is not None:
                    p.bias.data = self.bias[start:start + n]
                start += n
        self._views = tuple((p._parameters, p.weight, p.weight.data_ptr(), _version(p.weight)) for p in projs)
        return w, self.bias


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.o_bias)
        self._qkv = FusedRows((self.q_proj, self.k_proj, self.v_proj))  # one matmul per layer

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q/k/v weights (and biases) as one [(H + 2 Hkv) * D, hidden] tensor (``FusedRows``)."""
        return self._qkv.get()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKVAccess,
                backend: AttentionBackend) -> torch.Tensor:
        t, h, hkv = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = linear(x, *self._qkv.get()).view(t, h + 2 * hkv, self.head_dim)  # [T, H + 2 Hkv, D]
        cache, meta = kv.begin_layer(self.layer)  # may wait for this layer's stream-in
        if cpu_rope.rope_write_kv(qkv, h, cos, sin, cache, meta.slot_blocks, meta.slot_offsets):
            q = qkv[:, :h]  # rotated in place, k and v written (CPU kernel)
            k = qkv[:, h:h + hkv] if meta.is_prefill else None  # (a decode reads them from the cache)
        else:
            qk = apply_rotary(qkv[:, :h + hkv], cos, sin)  # q and k rotated in one pass: [T, H + Hkv, D]
            q, k = qk[:, :h], qk[:, h:]  # [T, H, D], [T, Hkv, D]
            backend.write_kv(cache, k, qkv[:, h + hkv:], meta)
        # prefill: [T, H, D]; decode: [B, H, D] with T == B
        if meta.is_prefill:
            assert k is not None
            out = backend.prefill(q, k, qkv[:, h + hkv:], meta)  # v: [T, Hkv, D]
        else:
            out = backend.decode(q, cache, meta)
        kv.end_layer(self.layer)  # may start this layer's offload
        o = self.o_proj
        return linear(out.reshape(t, h * self.head_dim), o.weight, o.bias)


MLP_CHUNK_ROWS = 256  # rows of one MLP chunk of a CPU prefill (see MLP.forward)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self._gate_up = FusedRows((self.gate_proj, self.up_proj))  # [2 * intermediate, hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A long prefill on the CPU goes through in row chunks: each chunk's [rows, intermediate]
        # gate/up outputs stay in the core's cache for silu, the product and the down matmul,
        # where a 4096-row step's 28 MB intermediates went through memory three times (the MLP
        # of a 4096-token prefill ran ~1.25x faster in chunks of 256 rows on a 2 MB-L2 EPYC).
        n = x.shape[0]
        if x.device.type != "cpu" or n <= MLP_CHUNK_ROWS:
            return self._swiglu(x)
        out = torch.empty((n, self.down_proj.weight.shape[0]), dtype=x.dtype)
        for i in range(0, n, MLP_CHUNK_ROWS):
            out[i:i + MLP_CHUNK_ROWS] = self._swiglu(x[i:i + MLP_CHUNK_ROWS])
        return out

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        if x.shape[0] >= FUSED_SWIGLU_MIN_ROWS and uses_onednn(x, g.weight) and uses_onednn(x, u.weight):
            # Many rows through oneDNN: silu and the product inside the gate and up matmuls as
            # oneDNN post-ops (``swiglu``).
            return linear(swiglu(x, g.weight, u.weight, g.bias, u.bias), d.weight, d.bias)
        # Otherwise gate and up as one matmul over the fused [2 * intermediate, hidden] weight, then
        # silu and the product of its halves. Few rows (decode): one
        # matmul call fewer per layer, whose fixed cost dominates a few-row matmul. Many rows
        # through MKL (Intel, ``linear.MKL_NATIVE``): one wide matmul ran a 512-row MLP 6 % faster
        # than two on a Sapphire Rapids core (in 256-row chunks: 6.11 against 6.52 ms a layer of
        # the small bench model).
        gate_up = linear(x, *self._gate_up.get())  # [rows, 2 * intermediate]
        act = cpu_silu.silu_mul(gate_up)  # CPU float32: one C pass (cpu_silu); else torch's two ops
        if act is None:
            i = gate_up.shape[1] // 2
            act = F.silu(gate_up[:, :i]).mul_(gate_up[:, i:])
        return linear(act, d.weight, d.bias)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKVAccess,
                backend: AttentionBackend, pending: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, this layer's MLP output): the caller adds the second to the first,
        the next layer as its ``pending``, in one pass with its input norm (``add_forward``)."""
        # x is this forward's own activation (never a caller's tensor): the residual adds go in place
        # (``.forward`` called directly: nn.Module.__call__'s hook handling costs ~2 us a call, four
        # calls a layer every step, and the model registers no hooks)
        norm = self.input_layernorm
        normed = norm.forward(x) if pending is None else norm.add_forward(x, pending)
        attn = self.self_attn.forward(normed, cos, sin, kv, backend)
        h = self.post_attention_layernorm.add_forward(x, attn)
        return x, self.mlp.forward(h)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (again after to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor,
                kv: LayerKVAccess, backend: AttentionBackend,
                max_position: int | None = None) -> torch.Tensor:
        """input_ids, positions [T] (requests packed back to back); logits_index [B] picks the token
        whose next-token distribution each request needs; ``max_position``: the largest position,
        when the caller knows it (RoPE's table, see ``RotaryEmbedding.forward``; by default the KV
        access's ``max_position`` where it has one, as ``StepAccess`` does). Returns float32
        logits [B, vocab]."""
        model = self.model
        if max_position is None:
            max_position = getattr(kv, "max_position", None)
        # (index_select: the rows F.embedding gives, without its dispatch, ~4x cheaper for a decode)
        x = model.embed_tokens.weight.index_select(0, input_ids)  # [T, hidden]
        cos, sin = model.rotary_emb.forward(positions, x.dtype, max_position)  # [T, D] each
        pending: torch.Tensor | None = None  # the last layer's MLP output, not yet added to x
        for layer in model.layers:  # (forward called directly: see DecoderLayer.forward)
            x, pending = layer.forward(x, cos, sin, kv, backend, pending)
        if pending is not None:
            x.add_(pending)
        # (index_select, not x[logits_index]: the same rows without advanced indexing's overhead)
        x = model.norm.forward(x.index_select(0, logits_index))  # [B, hidden]
        return linear(x, self.lm_head.weight).float()  # [B, vocab]
