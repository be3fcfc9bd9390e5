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
from worker_svc.model.config import ModelConfig


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
        dtype = x.dtype
        x32 = x.float()  # normalise in float32, as HF does, then scale in the model dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for given positions (plain or Llama-3 scaled frequencies)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self._inv_freq(torch.device("cpu")), persistent=False)  # [D/2]

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

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKVAccess,
                backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache, meta = kv.begin_layer(self.layer)  # may wait for this layer's stream-in
        backend.write_kv(cache, k, v, meta)
        # prefill: [T, H, D]; decode: [B, H, D] with T == B
        out = backend.prefill(q, k, v, meta) if meta.is_prefill else backend.decode(q, cache, meta)
        kv.end_layer(self.layer)  # may start this layer's offload
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKVAccess,
                backend: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


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
                kv: LayerKVAccess, backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions [T] (requests packed back to back); logits_index [B] picks the token
        whose next-token distribution each request needs. Returns float32 logits [B, vocab]."""
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.model.rotary_emb(positions, x.dtype)  # [T, D] each
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv, backend)
        x = self.model.norm(x[logits_index])  # [B, hidden]
        return self.lm_head(x).float()  # [B, vocab]
