"""Chunked prefill under a per-step token budget: running decodes go first (one token each), then
prefill chunks share the rest of the step in one mixed forward; later chunks attend to earlier ones
through the paged cache, host layers offload per chunk and stream earlier chunks in. Outputs equal
transformers for budgets of 1, 7, 16 and 64 tokens (all but the last smaller than the prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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


@pytest.mark.parametrize("host_access", ["stream", "direct"])
@pytest.mark.parametrize("budget", [1, 7, 16, 64])
def test_chunked_prefill_mixed_with_decodes_matches_transformers(hf_and_folder: tuple[Any, Path],
                                                                 budget: int, host_access: str) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=200, host_blocks=200, max_num_batched_tokens=budget,
                         host_access=host_access)
    lengths, news, arrivals = [5, 23, 11, 34, 2], [6, 3, 9, 5, 7], [0, 0, 2, 4, 5]
    letters = ["GGGG", "HGHG", "HHHH", "GHHG", "GGGG"]
    prompts = [prompt_of(n, 70 + i) for i, n in enumerate(lengths)]
    jobs = {f"r{i}": Job(prompts[i], news[i], arrive_step=arrivals[i], placement=letters[i])
            for i in range(5)}
    steps: list[StepOutput] = []
    got = run_engine(engine, jobs, steps=steps, max_steps=2000)
    for i in range(5):
        assert_matches(got[f"r{i}"], hf_generate(model, prompts[i], news[i]))
    for s in steps:
        assert s.stats.num_tokens == s.stats.num_prefill_tokens + s.stats.num_decode_requests <= budget
    kinds = {s.stats.kind for s in steps}
    if budget > 1:  # with one token a step, a decode and a chunk never share a step
        assert "mixed" in kinds
    assert sum(s.stats.num_prefill_tokens for s in steps) == sum(lengths)  # each prompt token once
    if budget < 34:  # so the longest prompt took several steps
        assert max(s.stats.num_prefill_tokens for s in steps) <= budget
    assert_all_free(engine)


def test_a_prompt_longer_than_the_budget_is_prefilled_over_several_steps(
        hf_and_folder: tuple[Any, Path]) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=100, host_blocks=100, max_num_batched_tokens=10,
                         max_promotions_per_step=0)
    first, long = prompt_of(6, 1), prompt_of(37, 2)
    engine.add_request("d", first, SamplingParams(max_tokens=12))
    engine.step()  # "d" is decoding now
    engine.add_request("p", long, SamplingParams(max_tokens=4), Placement.from_letters("HGHH", LAYERS))
    chunks: list[tuple[str, int, int]] = []
    tokens: dict[str, list[int]] = {"d": [], "p": []}
    while engine.has_work():
        out = engine.step()
        chunks.append((out.stats.kind, out.stats.num_prefill_tokens, out.stats.num_decode_requests))
        for o in out.outputs:
            tokens[o.request_id] += o.new_token_ids
    # 37 prompt tokens in chunks of 9 beside d's decode: 9, 9, 9, 9, 1, every one a mixed step.
    assert chunks[:5] == [("mixed", 9, 1)] * 4 + [("mixed", 1, 1)]
    assert tokens["p"] == hf_generate(model, long, 4).token_ids
    assert tokens["d"] == hf_generate(model, first, 12).token_ids[1:]  # its first came earlier
    assert_all_free(engine)


def test_host_layers_offload_each_chunk_and_stream_earlier_chunks_in(hf_and_folder: tuple[Any, Path]) -> None:
    _, folder = hf_and_folder
    engine = make_engine(folder, host_access="stream", block_size=4, gpu_blocks=100, host_blocks=100,
                         max_num_batched_tokens=8,
                         max_promotions_per_step=0)
    engine.add_request("p", prompt_of(24, 3), SamplingParams(max_tokens=1),
                       Placement.from_letters("HGGG", LAYERS))
    block = engine.geometry.bytes_per_block
    stats = [engine.step().stats for _ in range(3)]
    # Each 8-token chunk writes 2 new blocks of the host layer; chunk k reads back the 2k before it.
    assert [s.bytes_offloaded for s in stats] == [2 * block] * 3
    assert [s.bytes_loaded for s in stats] == [0, 2 * block, 4 * block]
    while engine.has_work():
        engine.step()
    assert_all_free(engine)
