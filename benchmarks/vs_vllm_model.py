"""Saves the one model folder both sides load: a seeded random-weight Llama in HF format.

``config.json`` and ``model.safetensors`` come from ``transformers`` (so vLLM reads them as any
Llama checkpoint); ``tokenizer.json`` is a word-level tokenizer with one word per id, enough for
vLLM to detokenize. Prompts are sent as token ids on both sides, so the text never matters.
The folder is rebuilt only when its recorded shape differs.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from benchmarks.vs_vllm_settings import ModelShape

_STAMP = "vs_vllm_shape.json"
BOS_ID, EOS_ID = 1, 2  # id 0 is the unknown token; prompts draw ids from 3 up


def ensure_model_folder(folder: Path, shape: ModelShape) -> Path:
    """``folder`` holding the model of ``shape`` (built when missing or different)."""
    stamp = folder / _STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(shape):
        return folder
    print(f"[model] saving a random Llama ({shape.parameters() / 1e6:.1f}M parameters, "
          f"{shape.num_layers} layers, seed {shape.seed}) to {folder}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    _save_weights(folder, shape)
    _save_tokenizer(folder, shape.vocab_size)
    stamp.write_text(json.dumps(asdict(shape), indent=2))
    return folder


def _save_weights(folder: Path, shape: ModelShape) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    # Older readers (vLLM's own transformers) look for rope_theta at the top level.
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _save_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 1 << 20,
    }, indent=2))
