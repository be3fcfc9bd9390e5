"""Preemption when KV growth finds no room, forced by a tiny GPU tier: recompute (the newest request
is dropped and re-prefilled from prompt + output) and swap-layers (its GPU layers move to the host
tier and it keeps decoding). Greedy outputs equal transformers and seeded ones an unpreempted run;
no token is repeated or changed; block accounting is exact after growth, preemption, finish and
abort."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.types import FinishReason, SamplingParams
from tests.test_engine_reference import (
    Job,
    Result,
    assert_all_free,
    assert_matches,
    hf_generate,
    make_engine,
    prompt_of,
    run_engine,
)
from worker_svc.engine import Engine
from worker_svc.outputs import StepOutput

LAYERS = 4
LENGTHS = (8, 9, 10)
NEW = 14


def tight(folder: Path, mode: str, host_blocks: int = 64, **kwargs: Any) -> Engine:
    # The three prompts take 2 + 3 + 3 blocks per layer (32 of 44); their outputs need 6 each (72).
    return make_engine(folder, block_size=4, gpu_blocks=44, host_blocks=host_blocks,
                       default_placement="all-gpu", preemption_mode=mode, max_promotions_per_step=0, **kwargs)


def jobs(sampling: SamplingParams | None = None) -> dict[str, Job]:
    return {f"r{i}": Job(prompt_of(n, 90 + i), NEW, sampling=sampling) for i, n in enumerate(LENGTHS)}


def preempted(steps: list[StepOutput]) -> list[str]:
    return [rid for s in steps for rid in s.preempted]


def assert_reports_consistent(steps: list[StepOutput]) -> None:
    for s in steps:
        assert set(s.preempted) <= set(s.waiting)  # recompute victims wait on the worker
        assert len(s.preempted) <= s.stats.num_preemptions
        running = {r.request_id for r in s.running}
        assert not running & set(s.waiting)


@pytest.mark.parametrize("host_access", ["stream", "direct"])
@pytest.mark.parametrize("mode", ["recompute", "swap-layers"])
def test_greedy_preemption_matches_transformers(hf_and_folder: tuple[Any, Path], mode: str,
                                                host_access: str) -> None:
    model, folder = hf_and_folder
    engine = tight(folder, mode, host_access=host_access)
    steps: list[StepOutput] = []
    work = jobs()
    got = run_engine(engine, work, steps=steps)
    for rid, job in work.items():
        assert_matches(got[rid], hf_generate(model, job.prompt, NEW))
    assert sum(s.stats.num_preemptions for s in steps) > 0
    if mode == "recompute":
        assert preempted(steps) and all(s.stats.num_swapped_layers == 0 for s in steps)
        # The newest request is the victim: the last one admitted.
        assert preempted(steps)[0] == "r2"
    else:
        assert sum(s.stats.num_swapped_layers for s in steps) > 0 and not preempted(steps)
        seen = {r.placement for s in steps for r in s.running if r.request_id == "r2"}
        assert any("H" in letters for letters in seen)  # r2 kept decoding with host layers
    assert_reports_consistent(steps)
    assert_all_free(engine)


@pytest.mark.parametrize("host_access", ["stream", "direct"])
@pytest.mark.parametrize("mode", ["recompute", "swap-layers"])
def test_seeded_preemption_continues_the_unpreempted_stream(hf_and_folder: tuple[Any, Path],
                                                            mode: str, host_access: str) -> None:
    _, folder = hf_and_folder
    sampling = SamplingParams(max_tokens=NEW, temperature=1.0, top_k=20, seed=1234, ignore_eos=True)
    roomy = make_engine(folder, block_size=4, gpu_blocks=400, host_blocks=64, default_placement="all-gpu")
    want = run_engine(roomy, jobs(sampling))
    engine = tight(folder, mode, host_access=host_access)
    steps: list[StepOutput] = []
    got = run_engine(engine, jobs(sampling), steps=steps)
    assert sum(s.stats.num_preemptions for s in steps) > 0
    for rid in want:
        assert got[rid].token_ids == want[rid].token_ids
        assert len(got[rid].token_ids) == NEW
        for a, b in zip(got[rid].logprobs, want[rid].logprobs, strict=True):
            assert abs(a - b) < 1e-4
    assert_all_free(engine)


def test_swap_layers_without_host_room_falls_back_to_recompute(hf_and_folder: tuple[Any, Path]) -> None:
    model, folder = hf_and_folder
    engine = tight(folder, "swap-layers", host_blocks=0)
    steps: list[StepOutput] = []
    work = jobs()
    got = run_engine(engine, work, steps=steps)
    for rid, job in work.items():
        assert_matches(got[rid], hf_generate(model, job.prompt, NEW))
    assert preempted(steps) and all(s.stats.num_swapped_layers == 0 for s in steps)
    assert_all_free(engine)


def test_per_request_mode_overrides_the_engine_default(hf_and_folder: tuple[Any, Path]) -> None:
    model, folder = hf_and_folder
    engine = tight(folder, "recompute")
    work = jobs()
    work["r2"].preemption = "swap-layers"  # the victim's own mode decides
    steps: list[StepOutput] = []
    got = run_engine(engine, work, steps=steps)
    for rid, job in work.items():
        assert_matches(got[rid], hf_generate(model, job.prompt, NEW))
    assert sum(s.stats.num_swapped_layers for s in steps) > 0
    assert_all_free(engine)


def test_accounting_exact_after_growth_preemption_finish_and_abort(hf_and_folder: tuple[Any, Path]) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, host_access="stream", block_size=3, gpu_blocks=60, host_blocks=40,
                         max_num_batched_tokens=16,
                         max_promotions_per_step=1)
    lengths = [7, 12, 5, 9, 14, 6]
    modes = ["recompute", "swap-layers", "swap-layers", "recompute", "swap-layers", "recompute"]
    letters = ["GGGG", "GHGG", None, "GGGG", "HGGG", None]
    work = {f"r{i}": Job(prompt_of(n, 200 + i), 12, arrive_step=i, placement=letters[i], preemption=modes[i])
            for i, n in enumerate(lengths)}
    steps: list[StepOutput] = []
    # r3 is aborted while it waits after a recompute preemption, r2 while it decodes swapped out.
    got = run_engine(engine, work, steps=steps, aborts={9: "r3", 12: "r2"})
    assert preempted(steps) == ["r3"] and sum(s.stats.num_swapped_layers for s in steps) >= 3
    first = next(s for s in steps if s.preempted)
    assert first.waiting == ("r3", "r4")  # requeued ahead of the request that arrived before it
    assert any(r.request_id == "r2" and r.placement == "HHHH" for s in steps for r in s.running)
    for rid, job in work.items():
        ref = hf_generate(model, job.prompt, 12)
        if got[rid].finish_reason is FinishReason.ABORT:
            n = len(got[rid].token_ids)
            assert_matches(got[rid], type(ref)(ref.token_ids[:n], ref.logprobs[:n]))
        else:
            assert_matches(got[rid], ref)
    assert got["r3"].finish_reason is FinishReason.ABORT is got["r2"].finish_reason
    assert_reports_consistent(steps)
    assert_all_free(engine)


def test_abort_of_a_preempted_request_while_it_waits(hf_and_folder: tuple[Any, Path]) -> None:
    _, folder = hf_and_folder
    engine = tight(folder, "recompute")
    for rid, job in jobs().items():
        engine.add_request(rid, job.prompt, SamplingParams(max_tokens=NEW))
    victim = None
    while victim is None:
        out = engine.step()
        victim = out.preempted[0] if out.preempted else None
    assert victim in out.waiting and engine.abort(victim)
    results: dict[str, Result] = {}
    while engine.has_work():
        for o in engine.step().outputs:
            results.setdefault(o.request_id, Result()).finish_reason = o.finish_reason
    assert results[victim].finish_reason is FinishReason.ABORT
    assert_all_free(engine)
