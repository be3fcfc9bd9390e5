"""On-demand KV growth: admission takes blocks for the prompt only, and every layer grows one block
at a time as decode crosses block boundaries, in every placement, with outputs identical to
transformers; a request whose max_tokens spans the whole context holds only the blocks it uses."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from common.errors import InvalidArgument
from common.placement import interleaved
from common.types import Placement, SamplingParams
from tests.test_engine_reference import (
    Job,
    assert_all_free,
    assert_matches,
    hf_generate,
    make_engine,
    prompt_of,
    run_engine,
)
from worker_svc.outputs import StepOutput

LAYERS = 4


def placements() -> list[str]:
    rnd = random.Random(11)
    return ["GGGG", "HHHH", interleaved(LAYERS, 2).letters, "".join(rnd.choice("GH") for _ in range(LAYERS))]


@pytest.mark.parametrize("letters", placements())
def test_growth_across_block_boundaries_matches_transformers(hf_and_folder: tuple[Any, Path],
                                                             letters: str) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=64, host_blocks=64, max_promotions_per_step=0)
    prompt = prompt_of(13, 4)  # 4 blocks; the outputs cross boundaries at 16, 20 and 24 tokens
    steps: list[StepOutput] = []
    held: list[int] = []
    original = engine.step

    def recording_step() -> StepOutput:
        out = original()
        table = engine.kv_manager.tables.get("g")
        if table is not None:
            held.append(table.blocks_per_layer)
            req = engine._requests["g"]
            # Exactly the blocks the cached tokens need, in the tiers the placement names.
            assert table.blocks_per_layer == engine.geometry.blocks_for(req.num_computed)
            gpu, host = out.usage.gpu, out.usage.host
            assert gpu.total_blocks - gpu.free_blocks == letters.count("G") * table.blocks_per_layer
            assert host.total_blocks - host.free_blocks == letters.count("H") * table.blocks_per_layer
        return out

    engine.step = recording_step  # type: ignore[method-assign]
    got = run_engine(engine, {"g": Job(prompt, 12, placement=letters)}, steps=steps)
    assert_matches(got["g"], hf_generate(model, prompt, 12))
    assert held[0] == 4 and held[-1] == engine.geometry.blocks_for(13 + 11)
    assert sorted(set(held)) == [4, 5, 6]  # one block per layer at a time
    assert_all_free(engine)


@pytest.mark.parametrize("host_access", ["stream", "direct"])
def test_staggered_growth_of_mixed_placements(hf_and_folder: tuple[Any, Path], host_access: str) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, block_size=3, gpu_blocks=120, host_blocks=120, host_access=host_access)
    letters = placements()
    lengths, news, arrivals = [5, 12, 8, 3], [10, 7, 9, 12], [0, 1, 3, 4]
    prompts = [prompt_of(n, 50 + i) for i, n in enumerate(lengths)]
    jobs = {f"r{i}": Job(prompts[i], news[i], arrive_step=arrivals[i], placement=letters[i])
            for i in range(4)}
    got = run_engine(engine, jobs)
    for i in range(4):
        assert_matches(got[f"r{i}"], hf_generate(model, prompts[i], news[i]))
    assert_all_free(engine)


def test_max_tokens_of_the_whole_context_holds_only_the_blocks_it_uses(
        hf_and_folder: tuple[Any, Path]) -> None:
    model, folder = hf_and_folder
    # 40 GPU blocks: 10 per layer, 40 tokens, far less than the 256-token context max_tokens spans.
    engine = make_engine(folder, block_size=4, gpu_blocks=40, host_blocks=0, default_placement="all-gpu")
    prompt = prompt_of(20, 8)
    whole = engine.max_model_len - len(prompt)
    assert engine.can_admit(len(prompt), whole)
    engine.add_request("long", prompt, SamplingParams(max_tokens=whole, ignore_eos=True))
    tokens: list[int] = []
    for _ in range(12):
        out = engine.step()
        tokens += [t for o in out.outputs for t in o.new_token_ids]
        cached = len(prompt) + len(tokens) - 1
        assert out.usage.gpu.used_per_layer == (engine.geometry.blocks_for(cached),) * LAYERS
    assert out.usage.gpu.used_per_layer == (8,) * LAYERS  # 31 cached tokens, not 64 blocks per layer
    assert tokens == hf_generate(model, prompt, 12).token_ids
    assert engine.abort("long")
    engine.step()
    assert_all_free(engine)


def test_never_fits_is_judged_on_the_prompt_and_one_block(hf_and_folder: tuple[Any, Path]) -> None:
    _, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=16, host_blocks=0, default_placement="all-gpu")
    gpu = Placement.all_gpu(LAYERS)
    engine.validate(prompt_of(12, 1), SamplingParams(max_tokens=200), gpu)  # 3 + 1 blocks per layer: fits
    with pytest.raises(InvalidArgument, match="can never be admitted"):
        engine.validate(prompt_of(13, 1), SamplingParams(max_tokens=200), gpu)  # 4 + 1 blocks do not


def test_a_request_alone_that_cannot_grow_fails_with_a_clear_error(hf_and_folder: tuple[Any, Path]) -> None:
    _, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=16, host_blocks=0, default_placement="all-gpu")
    engine.add_request("big", prompt_of(12, 1), SamplingParams(max_tokens=100, ignore_eos=True))
    outputs = []
    while engine.has_work():
        outputs += engine.step().outputs
    tokens = [t for o in outputs for t in o.new_token_ids]
    assert len(tokens) == 5  # 16 cached tokens fill the tier: the 17th cannot be held
    last = outputs[-1]
    assert last.finished and last.finish_reason is not None and last.finish_reason.value == "error"
    assert "cannot hold 17 tokens" in (last.error or "")
    assert_all_free(engine)
