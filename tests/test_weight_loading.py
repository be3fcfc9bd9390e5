"""Weights are materialised once, in their target dtype: the peak of live tensor bytes while a model
loads (safetensors shards, GGUF, random presets) stays within the weights in that dtype plus one
shard, and ``weight_bytes`` (what the memory plan charges) equals the parameters' real size.

Peak bytes are measured on CPU with a tracking substitute for a device allocator: a dispatch mode
that sees every tensor an operator creates and follows its storage until it is freed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.test_engine_reference import build_hf_model, save_model
from tests.test_gguf_model import write_tiny_gguf
from worker_svc.model.config import PRESETS
from worker_svc.model.loader import load_model, weight_bytes


class LiveBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storages created by operators while active, each counted until
    its storage is freed (views and parameters sharing a storage count once)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def test_tracker_counts_a_float32_copy_that_a_cast_leaves_behind() -> None:
    """The measuring tool itself: a float32 tensor cast to bfloat16 while alive peaks at both."""
    with LiveBytes() as t:
        a = torch.empty(1 << 16, dtype=torch.float32)
        b = a.to(torch.bfloat16)
        del a
    assert t.peak == (1 << 16) * 6
    assert b.dtype is torch.bfloat16


def test_weight_bytes_of_the_llama3_8b_geometry() -> None:
    """8,030,261,248 parameters (Llama-3-8B), 2 bytes each in bfloat16, counted without memory."""
    assert weight_bytes(PRESETS["llama3-8b-random"], 2) == 8_030_261_248 * 2


@pytest.mark.parametrize("tie", [False, True])
def test_sharded_float32_checkpoint_loads_into_bfloat16_within_weights_plus_one_shard(
        tmp_path: Path, tie: bool) -> None:
    hf = build_hf_model("llama", layers=4, tie=tie)
    folder = save_model(hf, tmp_path / "m", shard="100KB")  # float32 on disk, several shards
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2
    with LiveBytes() as t:
        loaded = load_model(str(folder), torch.device("cpu"), torch.bfloat16)
    params = dict(loaded.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    weights = weight_bytes(loaded.config, 2)
    assert weights == sum(p.numel() * p.element_size() for p in params.values())
    largest_shard = max(s.stat().st_size for s in shards)
    assert t.peak <= weights + largest_shard, (t.peak, weights, largest_shard)
    # the weights are the checkpoint's, cast once
    for name, ref in hf.state_dict().items():
        if name in params:
            assert torch.equal(params[name], ref.to(torch.bfloat16)), name
    if tie:
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_gguf_loads_into_bfloat16_within_weights_plus_one_tensor(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, seed=1)
    with LiveBytes() as t:
        loaded = load_model(str(path), torch.device("cpu"), torch.bfloat16)
    params = list(loaded.model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    weights = weight_bytes(loaded.config, 2)
    largest = max(p.numel() for p in params) * 4  # one dequantized tensor, even in float32
    rotary = loaded.model.model.rotary_emb.inv_freq.numel() * 4  # the float32 RoPE table
    assert t.peak <= weights + largest + rotary, (t.peak, weights, largest)


def test_random_preset_allocates_only_its_weights() -> None:
    with LiveBytes() as t:
        loaded = load_model("tiny-llama", torch.device("cpu"), torch.bfloat16)
    weights = weight_bytes(loaded.config, 2)
    rotary = loaded.model.model.rotary_emb.inv_freq.numel() * 4
    assert t.peak <= weights + rotary + 4096, (t.peak, weights)  # + the generator's small scratch
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
