"""Builds a model on a device: from a local HF folder (``*.safetensors``, sharded through
``model.safetensors.index.json`` or not), from a GGUF file (a ``.gguf`` path, a folder holding one, or
a model name such as ``smollm2``, see ``catalog``) or from a named preset with seeded random weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import InvalidArgument, NotFound
from common.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from worker_svc.model.catalog import NAMED_MODELS, named_model_path
from worker_svc.model.config import PRESETS, ModelConfig
from worker_svc.model.llama import LlamaForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready to run, with its config and tokenizer."""

    name: str
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidArgument(f"dtype {name!r} is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def load_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    if name in PRESETS:
        config = PRESETS[name]
        model = _random_model(config, device, dtype, seed)
        return LoadedModel(name, config, model, ByteTokenizer(config.bos_token_id or 256,
                                                                 config.eos_token_id or 257))
    gguf_file = _gguf_file(name)
    if gguf_file is not None:
        from worker_svc.model.gguf_loader import load_gguf

        return load_gguf(gguf_file, name, device, dtype)
    folder = Path(name)
    if not folder.is_dir():
        raise NotFound(f"model {name!r} is neither a preset ({', '.join(PRESETS)}), a model name "
                       f"({', '.join(NAMED_MODELS)}), a .gguf file nor a local folder")
    config = ModelConfig.from_folder(folder)
    model = empty_model(config, device, dtype)
    _load_safetensors(model, folder)
    model.eval()
    tokenizer: Tokenizer
    try:
        tokenizer = load_tokenizer(folder, config.bos_token_id, config.eos_token_id)
    except NotFound:
        # No tokenizer.json: the model still serves token ids; text decodes as bytes (best effort).
        tokenizer = ByteTokenizer(max(256, config.vocab_size), max(257, config.vocab_size + 1))
    return LoadedModel(str(folder), config, model, tokenizer)


def _gguf_file(name: str) -> Path | None:
    """The GGUF file ``name`` stands for: a model name, a ``.gguf`` path, or a folder with one GGUF
    file and no config.json; None for anything else."""
    if name in NAMED_MODELS:
        return named_model_path(name)
    path = Path(name)
    if path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise InvalidArgument(f"model folder {name!r} holds several GGUF files "
                                  f"({', '.join(f.name for f in files)}): name one")
        return files[0] if files else None
    return None


def empty_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model with uninitialised weights allocated once, on ``device`` in ``dtype``.

    Built on the meta device and cast there (free), so the only allocation is the weights in their
    target dtype: building on the device first and then casting would hold a float32 copy of every
    weight on the device (an 8B model: 32 GB before the 16 GB of bfloat16), and the caching
    allocator would keep that memory reserved, out of the KV tier's reach."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.model.rotary_emb.reset(device)  # buffers were emptied on the meta device; rebuild them
    return model


def weight_bytes(config: ModelConfig, element_size: int) -> int:
    """Bytes of the model's parameters in a dtype of ``element_size`` bytes (tied weights once),
    counted on the meta device: no memory is touched, whatever the model's size."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters()) * element_size  # parameters() dedups ties


def _random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                  seed: int) -> LlamaForCausalLM:
    model = empty_model(config, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname:
                p.fill_(1.0)
            elif pname.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def _load_safetensors(model: LlamaForCausalLM, folder: Path) -> None:
    """Copy every checkpoint tensor into its parameter, one tensor at a time: each is read on the
    host and copied once into its parameter, so the device never holds more than the weights and
    the host no more than one tensor (not a whole shard)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise NotFound(f"model folder {str(folder)!r} has no *.safetensors weights")
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for file in files:
            with safe_open(str(folder / file), framework="pt", device="cpu") as shard:
                for key in shard.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    if key not in params:
                        continue  # e.g. rotary inv_freq saved by old checkpoints
                    shape = tuple(shard.get_slice(key).get_shape())
                    if tuple(params[key].shape) != shape:
                        raise InvalidArgument(f"weight {key} has shape {shape}, "
                                              f"config expects {tuple(params[key].shape)}")
                    # copy_ casts on the host for a host-to-device copy (and in place on a
                    # CPU device): no checkpoint-dtype tensor ever lands on the device
                    params[key].copy_(shard.get_tensor(key))
                    loaded.add(key)
    missing = set(params) - loaded
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise InvalidArgument(f"model folder {str(folder)!r} lacks weights: {', '.join(sorted(missing)[:5])}")
