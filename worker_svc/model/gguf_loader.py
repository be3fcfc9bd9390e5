"""Loads a Llama-family model from a GGUF file (llama.cpp's format) into our model, in our dtype.

Every tensor is dequantized at load (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and whatever else the ``gguf``
package can dequantize) and copied into the HuggingFace-named parameter it maps to. llama.cpp's
converter permutes the rows of Llama's q/k projections (to its interleaved rotary layout); we undo
that, as transformers' GGUF integration does, because our rotary embedding is HF's rotate-half form.
The config, tokenizer and chat template come from the file's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import InvalidArgument, Unsupported
from worker_svc.model.config import ModelConfig
from worker_svc.model.gguf_tokenizer import GGUFVocab, build_tokenizer, open_gguf, read_metadata

# GGUF architecture -> (our architecture name, q/k/v biases, q/k rows permuted by llama.cpp)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", False, True),
    "qwen2": ("Qwen2ForCausalLM", True, False),
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], vocab: GGUFVocab) -> ModelConfig:
    """Our ModelConfig from the ``<arch>.*`` keys (names as llama.cpp writes them)."""
    arch = str(meta.get("general.architecture", ""))
    if arch not in _ARCHITECTURES:
        raise Unsupported(f"GGUF architecture {arch!r} is not supported "
                          f"(supported: {', '.join(_ARCHITECTURES)})")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensor_names or scaling not in ("none", ""):
        raise Unsupported("GGUF files with scaled RoPE frequencies (rope_freqs / rope.scaling) "
                          "are not supported")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise InvalidArgument(f"the GGUF file lacks the metadata key {arch}.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise Unsupported(f"partial rotary embeddings (rope.dimension_count {rotary} < head dim {head_dim})")
    name, qkv_bias, _ = _ARCHITECTURES[arch]
    return ModelConfig(
        architecture=name,
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(vocab.tokens)),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        qkv_bias=qkv_bias or "blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=vocab.bos_token_id,
        eos_token_ids=vocab.stop_token_ids,
    )


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for tensors we skip."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def unpermute_rotary(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, rows (pair, 2) interleaved back to two halves.
    rows [n_head * D, ...] (a weight or a bias)."""
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def dequantize(tensor: Any) -> np.ndarray:
    """float32 array in PyTorch's [out, in] order (GGUF lists dimensions innermost first)."""
    from gguf import quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise Unsupported(f"tensor {tensor.name}: GGUF type {tensor.tensor_type.name} cannot be "
                          f"dequantized ({exc})") from exc
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    return values if values.flags.writeable else values.copy()  # F32 data is a read-only file view


def load_gguf(path: Path, name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A ``LoadedModel`` (model, config, tokenizer with chat template) from one GGUF file."""
    from worker_svc.model.loader import LoadedModel, empty_model

    reader = open_gguf(path)
    meta = read_metadata(reader)
    vocab = GGUFVocab.from_metadata(meta)
    names = {t.name for t in reader.tensors}
    config = config_from_metadata(meta, names, vocab)
    permuted = _ARCHITECTURES[str(meta["general.architecture"])][2]
    tokenizer = build_tokenizer(vocab)
    model = empty_model(config, device, dtype)  # the weights once, in their dtype
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for tensor in reader.tensors:
            key = hf_name(tensor.name)
            if key is None or key not in params:
                continue
            values = dequantize(tensor)
            if permuted and ".q_proj." in key:
                values = unpermute_rotary(values, config.num_heads)
            elif permuted and ".k_proj." in key:
                values = unpermute_rotary(values, config.num_kv_heads)
            if tuple(params[key].shape) != values.shape:
                raise InvalidArgument(f"GGUF tensor {tensor.name} has shape {values.shape}, the config "
                                      f"expects {tuple(params[key].shape)} for {key}")
            # copy_ casts on the host for a host-to-device copy: no float32 tensor on the device
            params[key].copy_(torch.from_numpy(values))
            loaded.add(key)
    missing = set(params) - loaded - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise InvalidArgument(f"GGUF file {str(path)!r} lacks tensors for: {', '.join(sorted(missing)[:5])}")
    return LoadedModel(name, config, model.eval(), tokenizer)
