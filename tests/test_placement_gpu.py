"""GPU checks of layer-wise placement (CUDA, bfloat16): every placement, alone and in a staggered
mixed batch with promotion, gives the tokens of the all-GPU run; flash-attn (when installed) agrees
with SDPA. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from common.placement import interleaved
from tests.test_engine_reference import Job, build_hf_model, make_engine, prompt_of, run_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
LAYERS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    build_hf_model("llama", layers=LAYERS, heads=4, kv_heads=2).save_pretrained(path)
    return path


def _jobs(placements: list[str | None]) -> dict[str, Job]:
    lengths, news, arrivals = [7, 40, 13, 3, 26], [8, 5, 12, 9, 6], [0, 0, 1, 3, 6]
    return {f"r{i}": Job(prompt_of(lengths[i], 30 + i), news[i], arrive_step=arrivals[i], placement=p)
            for i, p in enumerate(placements)}


@pytest.mark.parametrize("placement", ["HHHH", interleaved(LAYERS, 2).letters, "GHHG", "HGGG"])
def test_cuda_bf16_placement_matches_all_gpu(folder: Path, placement: str) -> None:
    kwargs: dict[str, Any] = dict(device="cuda", dtype="bfloat16", block_size=16, gpu_blocks=256,
                                  host_blocks=256)
    base = run_engine(make_engine(folder, **kwargs), _jobs(["GGGG"] * 5))
    got = run_engine(make_engine(folder, **kwargs), _jobs([placement] * 5))
    for rid in base:
        assert got[rid].token_ids == base[rid].token_ids


def test_cuda_mixed_placements_with_promotion(folder: Path) -> None:
    kwargs: dict[str, Any] = dict(device="cuda", dtype="bfloat16", block_size=4, host_blocks=256)
    base = run_engine(make_engine(folder, gpu_blocks=512, **kwargs), _jobs(["GGGG"] * 5))
    # A small GPU tier: later requests get partial placements, then promotion as others finish.
    engine = make_engine(folder, gpu_blocks=48, max_promotions_per_step=1, **kwargs)
    got = run_engine(engine, _jobs([None, "HGHG", None, "HHHH", None]))
    for rid in base:
        assert got[rid].token_ids == base[rid].token_ids
    usage = engine.usage()
    assert usage.gpu.free_blocks == usage.gpu.total_blocks
    assert usage.host.free_blocks == usage.host.total_blocks


def test_flash_attn_agrees_with_sdpa(folder: Path) -> None:
    pytest.importorskip("flash_attn")
    kwargs: dict[str, Any] = dict(device="cuda", dtype="bfloat16", gpu_blocks=256)
    sdpa = make_engine(folder, attention_backend="sdpa", **kwargs)
    flash = make_engine(folder, attention_backend="flash-attn", **kwargs)
    assert flash.backend.name == "flash-attn"
    a = run_engine(sdpa, _jobs(["GGGG", "HGHG", None, None, "GGGG"]))
    b = run_engine(flash, _jobs(["GGGG", "HGHG", None, None, "GGGG"]))
    for rid in a:
        assert a[rid].token_ids[:3] == b[rid].token_ids[:3]  # bf16 kernels may diverge later on near-ties
        for x, y in zip(a[rid].logprobs[:3], b[rid].logprobs[:3], strict=True):
            assert abs(x - y) < 5e-2
