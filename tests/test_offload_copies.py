"""Copies between the tiers under delay: a fake copy engine runs each copy lazily (reading its
source only when it executes, like an asynchronous copy), completing only after being polled a few
times or waited for. With it: a staging block is never handed out while a copy still reads or
writes it, outputs stay identical to transformers, and an abort while a copy is in flight frees
the blocks only once the copy is done."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.types import Placement, SamplingParams
from tests.test_engine_reference import (
    assert_matches,
    hf_generate,
    make_engine,
    prompt_of,
)
from worker_svc.kv.offload import CopyHandle, CopyRun, runs_array

LAYERS = 4


class DelayedHandle:
    def __init__(self, engine: DelayedCopyEngine) -> None:
        self.engine = engine
        self.executed = False
        self.polls = 0

    def done(self) -> bool:
        self.polls += 1
        if self.polls > self.engine.delay_polls:
            self.engine.run_until(self)
        return self.executed

    def wait(self) -> None:
        self.engine.waits += 1
        self.engine.run_until(self)

    def order_compute_after(self) -> None:
        assert self.executed, "compute was ordered after a copy nobody waited for"


class DelayedCopyEngine:
    """FIFO copies that only happen later; records which blocks each pending copy touches."""

    def __init__(self, delay_polls: int) -> None:
        self.delay_polls = delay_polls
        self.queue: deque[tuple[DelayedHandle, torch.Tensor, torch.Tensor, list[CopyRun]]] = deque()
        self.waits = 0
        self.copies = 0

    def copy_blocks(self, src: torch.Tensor, src_ids: list[int], dst: torch.Tensor,
                    dst_ids: list[int]) -> CopyHandle:
        return self.copy_runs(src, dst, runs_array(src_ids, dst_ids))

    def copy_runs(self, src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray) -> CopyHandle:
        handle = DelayedHandle(self)
        self.queue.append((handle, src, dst, [CopyRun(int(s), int(d), int(n)) for s, d, n in runs]))
        return handle

    def run_until(self, handle: DelayedHandle) -> None:
        while not handle.executed:
            h, src, dst, runs = self.queue.popleft()
            for r in runs:
                dst[r.dst:r.dst + r.length].copy_(src[r.src:r.src + r.length])
            h.executed = True
            self.copies += 1

    def busy_gpu_blocks(self, gpu: torch.Tensor) -> set[int]:
        """GPU-tensor block ids that a pending copy reads or writes."""
        ids: set[int] = set()
        for _, src, dst, runs in self.queue:
            for r in runs:
                if src is gpu:
                    ids.update(range(r.src, r.src + r.length))
                if dst is gpu:
                    ids.update(range(r.dst, r.dst + r.length))
        return ids


@pytest.mark.parametrize("delay", [1, 3])
def test_staging_block_never_reused_before_its_copy_completes(
        hf_and_folder: tuple[Any, Path], delay: int) -> None:
    model, folder = hf_and_folder
    copies = DelayedCopyEngine(delay_polls=delay)
    prompts = [prompt_of(18, 1), prompt_of(7, 2)]
    # Staging holds exactly two layers of both requests (24 tokens -> 6 blocks, 15 -> 4 blocks).
    engine = make_engine(folder, host_access="stream", block_size=4, gpu_blocks=64, host_blocks=128,
                         staging_blocks=20,
                         copy_engine=copies)  # type: ignore[arg-type]
    staging = engine.kv_manager.staging
    original = staging.take
    handed_out = 0

    def checked_take(n: int, side: int) -> int:
        nonlocal handed_out
        lo = original(n, side)
        clash = set(range(lo, lo + n)) & copies.busy_gpu_blocks(engine.kv.gpu)
        assert not clash, f"staging blocks {sorted(clash)} handed out while a copy still uses them"
        handed_out += n
        return lo

    staging.take = checked_take  # type: ignore[method-assign]
    engine.add_request("a", prompts[0], SamplingParams(max_tokens=6), Placement.from_letters("HHHH", 4))
    engine.add_request("b", prompts[1], SamplingParams(max_tokens=8), Placement.from_letters("HGHH", 4))
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    lps: dict[str, list[float]] = {"a": [], "b": []}
    while engine.has_work():
        for o in engine.step().outputs:
            tokens[o.request_id] += o.new_token_ids
            lps[o.request_id] += o.logprobs
    for rid, prompt, n in (("a", prompts[0], 6), ("b", prompts[1], 8)):
        from tests.test_engine_reference import Result

        assert_matches(Result(tokens[rid], lps[rid]), hf_generate(model, prompt, n))
    assert copies.waits > 0, "the test never made compute wait for a delayed copy"
    assert handed_out > staging.num_blocks  # staging blocks really were reused
    assert not copies.queue
    usage = engine.usage()
    assert usage.host.free_blocks == usage.host.total_blocks
    assert usage.gpu.free_blocks == usage.gpu.total_blocks
    assert staging.num_free == staging.num_blocks


def test_abort_while_copy_in_flight_frees_after_the_copy(hf_and_folder: tuple[Any, Path]) -> None:
    _, folder = hf_and_folder
    copies = DelayedCopyEngine(delay_polls=1000)  # copies finish only when someone waits
    engine = make_engine(folder, host_access="stream", block_size=4, gpu_blocks=64, host_blocks=64,
                         copy_engine=copies)  # type: ignore[arg-type]
    engine.add_request("a", prompt_of(10, 1), SamplingParams(max_tokens=6), Placement.from_letters("GHGH", 4))
    out = engine.step()  # prefill: two layers stored to the host, copies pending
    assert copies.queue and out.usage.host.used_per_layer == (0, 3, 0, 3)  # 10 tokens: 3 blocks
    assert engine.abort("a")
    engine.step()
    usage = engine.usage()
    assert usage.gpu.free_blocks == 64  # nothing in flight touches its GPU blocks
    assert usage.host.used_per_layer == (0, 3, 0, 3)  # still the target of pending stores
    assert engine.has_work()
    copies.run_until(copies.queue[-1][0])
    while engine.has_work():
        engine.step()
    usage = engine.usage()
    assert usage.host.free_blocks == 64 and usage.host.used_per_layer == (0, 0, 0, 0)
    assert engine.kv_manager.staging.num_free == engine.kv_manager.staging.num_blocks


def test_swap_out_and_promotion_back_with_copies_in_flight(hf_and_folder: tuple[Any, Path]) -> None:
    from tests.test_engine_reference import Job, assert_all_free, run_engine
    from worker_svc.outputs import StepOutput

    model, folder = hf_and_folder
    copies = DelayedCopyEngine(delay_polls=4)
    # 44 GPU blocks hold the three prompts but not their growth: swap-layers moves layers to the
    # host; once the first requests finish, promotion brings them back while copies lag behind.
    engine = make_engine(folder, host_access="stream", block_size=4, gpu_blocks=44, host_blocks=64,
                         default_placement="all-gpu",
                         preemption_mode="swap-layers", max_promotions_per_step=1,
                         copy_engine=copies)  # type: ignore[arg-type]
    lengths = ((8, 14), (9, 24), (10, 24))  # (prompt, max_tokens): r0 finishes first and frees room
    jobs = {f"r{i}": Job(prompt_of(n, 90 + i), m, arrive_step=i) for i, (n, m) in enumerate(lengths)}
    steps: list[StepOutput] = []
    got = run_engine(engine, jobs, steps=steps)
    for rid, job in jobs.items():
        assert_matches(got[rid], hf_generate(model, job.prompt, job.max_tokens))
    assert sum(s.stats.num_swapped_layers for s in steps) > 0
    history: dict[str, list[int]] = {}  # host layers of each running request, step by step
    for s in steps:
        for r in s.running:
            history.setdefault(r.request_id, []).append(r.placement.count("H"))
    swapped_back = [rid for rid, h in history.items() if max(h) > 0 and h[-1] < max(h)]
    assert swapped_back, history  # a swapped-out request got layers promoted back while decoding
    assert copies.waits > 0
    assert_all_free(engine)
