"""Layer-wise placement on CPU: every placement (all GPU, all host, interleaved, random, the paper's
rule) gives the same greedy tokens as transformers, alone and in staggered mixed batches, with host
layers streamed through staging (the GPU path) and read in place (the CPU default); partial
placement admits a request the GPU tier cannot hold whole; promotion mid-decode; exact block
accounting in both tiers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from common.placement import interleaved, rule_placement
from common.types import CostModel, Placement, SamplingParams
from tests.test_engine_reference import (
    Job,
    assert_matches,
    hf_generate,
    make_engine,
    prompt_of,
    run_engine,
)
from worker_svc.engine import Engine

LAYERS = 4


def rule_letters(engine: Engine, prompt_len: int) -> str:
    # A slow copy link: only some layers' copies hide under the predicted prefill.
    cost = CostModel(d2h_bytes_per_s=engine.geometry.bytes_per_layer(prompt_len) * 1000.0,
                     prefill_per_token_s=2.5e-3 / prompt_len)  # time to copy 2.5 layers
    letters = rule_placement(prompt_len, engine.geometry, cost).letters
    assert "G" in letters and "H" in letters, letters  # the rule really mixes tiers here
    return letters


def all_placements(engine: Engine, prompt_len: int) -> list[str]:
    rnd = random.Random(5)
    return ["GGGG", "HHHH", interleaved(LAYERS, 2).letters,
            "".join(rnd.choice("GH") for _ in range(LAYERS)), rule_letters(engine, prompt_len)]


def assert_pools_full(engine: Engine) -> None:
    usage = engine.usage()
    assert usage.gpu.free_blocks == usage.gpu.total_blocks
    assert usage.host.free_blocks == usage.host.total_blocks
    assert usage.gpu.used_per_layer == (0,) * LAYERS == usage.host.used_per_layer


HOST_ACCESS = ["stream", "direct"]


@pytest.mark.parametrize("host_access", HOST_ACCESS)
@pytest.mark.parametrize("block_size", [16, 3])
def test_every_placement_matches_single_prompt(hf_and_folder: tuple[Any, Path],
                                               block_size: int, host_access: str) -> None:
    model, folder = hf_and_folder
    prompt = prompt_of(21, 2)
    ref = hf_generate(model, prompt, 6)
    engine = make_engine(folder, block_size=block_size, gpu_blocks=64, host_blocks=64,
                         host_access=host_access)
    for letters in all_placements(engine, len(prompt)):
        got = run_engine(engine, {letters: Job(prompt, 6, placement=letters)})
        assert_matches(got[letters], ref)
        assert_pools_full(engine)


@pytest.mark.parametrize("host_access", HOST_ACCESS)
def test_staggered_mixed_placements_decode_together(hf_and_folder: tuple[Any, Path],
                                                    host_access: str) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=200, host_blocks=200, host_access=host_access)
    placements = all_placements(engine, 20)
    lengths, news, arrivals = [7, 20, 13, 3, 26], [8, 5, 7, 9, 4], [0, 0, 1, 3, 6]
    prompts = [prompt_of(n, 30 + i) for i, n in enumerate(lengths)]
    jobs = {f"r{i}": Job(prompts[i], news[i], arrive_step=arrivals[i], placement=placements[i])
            for i in range(5)}
    got = run_engine(engine, jobs)
    for i in range(5):
        assert_matches(got[f"r{i}"], hf_generate(model, prompts[i], news[i]))
    assert_pools_full(engine)


def test_partial_placement_admits_instead_of_waiting(hf_and_folder: tuple[Any, Path]) -> None:
    _, folder = hf_and_folder
    for mode in ("auto", "all-gpu"):
        engine = make_engine(folder, host_access="stream", block_size=4, gpu_blocks=40, host_blocks=64,
                             default_placement=mode)
        # A running request holds 4 layers x 4 blocks after its prefill, 4 x 5 once it decodes.
        engine.add_request("f", prompt_of(16, 3), SamplingParams(max_tokens=4))
        engine.step()
        # 32 prompt tokens in blocks of 4: 8 blocks per layer (9 with the first token's growth),
        # 32 for the whole prompt; 20 are free while "f" decodes. max_tokens reserves nothing.
        engine.add_request("p", prompt_of(32, 1), SamplingParams(max_tokens=10))
        out = engine.step()
        if mode == "all-gpu":
            assert out.admitted == ()  # a whole-GPU placement of the prompt does not fit: it waits
            continue
        assert out.admitted == ("p",)
        assert out.stats.kind == "mixed" and out.stats.num_decode_requests == 1
        letters = next(s.placement for s in out.running if s.request_id == "p")
        assert letters == interleaved(LAYERS, 2).letters  # 20 // 9 = 2 layers fit on the GPU
        assert out.usage.gpu.free_blocks == 40 - 20 - 16 and out.usage.host.free_blocks == 64 - 16
        assert out.stats.bytes_offloaded == 2 * 8 * engine.geometry.bytes_per_block  # 32 tokens = 8 blocks


def test_promotion_mid_decode(hf_and_folder: tuple[Any, Path]) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, host_access="stream", block_size=4, gpu_blocks=32, host_blocks=64,
                         max_promotions_per_step=1)
    first, second = prompt_of(10, 1), prompt_of(24, 2)
    # "a" holds 4 layers x 3 blocks (4 once it grows) of 32 GPU blocks; "b" (a 24-token prompt,
    # 8 blocks per layer at its longest) gets 2 GPU layers at first, all 4 once "a" has finished.
    jobs = {"a": Job(first, 6), "b": Job(second, 9, arrive_step=1)}
    seen: list[str] = []
    original_step = engine.step

    def recording_step():  # type: ignore[no-untyped-def]
        out = original_step()
        seen.extend(s.placement for s in out.running if s.request_id == "b")
        return out

    engine.step = recording_step  # type: ignore[method-assign]
    got = run_engine(engine, jobs)
    assert_matches(got["a"], hf_generate(model, first, 6))
    assert_matches(got["b"], hf_generate(model, second, 9))
    assert seen[0].count("G") == 2
    # After "a" finishes, b's host layers come back one per step until it is fully GPU-resident.
    gpu_counts = [s.count("G") for s in seen]
    assert gpu_counts == sorted(gpu_counts) and gpu_counts[-1] == LAYERS
    assert any(1 < c < LAYERS for c in gpu_counts)
    assert_pools_full(engine)


def test_abort_with_host_layers_frees_both_tiers(hf_and_folder: tuple[Any, Path]) -> None:
    _, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=64, host_blocks=64, max_promotions_per_step=0)
    engine.add_request("a", prompt_of(9, 1), SamplingParams(max_tokens=8), Placement.from_letters("HGHH", 4))
    engine.add_request("b", prompt_of(5, 2), SamplingParams(max_tokens=8), Placement.from_letters("GHGH", 4))
    engine.step()
    engine.step()
    used = engine.usage()
    # Only the blocks in use: a holds 10 tokens = 3 blocks per layer, b 6 tokens = 2 blocks.
    assert used.host.used_per_layer == (3, 2, 3, 5) and used.gpu.used_per_layer == (2, 3, 2, 0)
    engine.abort("a")
    while engine.has_work():
        engine.step()
    assert_pools_full(engine)


@pytest.mark.parametrize("failing_step", ["prefill", "decode"])
def test_a_forward_that_fails_midway_returns_its_staging_blocks(
        hf_and_folder: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch, failing_step: str) -> None:
    _, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, max_promotions_per_step=0)  # keep the host layers
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("doomed", prompt_of(10, seed=1), sampling, Placement.from_letters("HHGH", LAYERS))
    if failing_step == "decode":
        engine.step()  # the prefill succeeds; the first decode fails
    backend = engine.backend

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected attention failure")

    # Attention fails after layer 0's staging blocks were taken (and layer 1's streamed in, in decode).
    monkeypatch.setattr(backend, failing_step, explode)
    out = engine.step()
    assert [(o.request_id, o.finish_reason.value if o.finish_reason else None) for o in out.outputs] == [
        ("doomed", "error")]
    assert "injected attention failure" in (out.outputs[0].error or "")
    staging = engine.kv_manager.staging
    assert staging.idle and staging.num_free == staging.num_blocks
    assert_pools_full(engine)
    monkeypatch.undo()
    engine.add_request("next", prompt_of(10, seed=2), sampling, Placement.from_letters("HHGH", LAYERS))
    tokens: list[int] = []
    while engine.has_work():
        for o in engine.step().outputs:
            tokens += o.new_token_ids
            assert o.error is None
    assert len(tokens) == 4  # the engine keeps serving
    assert_pools_full(engine)
