"""Batched copy calls (one per layer and direction, as the CUDA copy engine now makes them) move
exactly the bytes the run-by-run path moves: the KV of both tiers (staging included) is bit-equal
after every step, in every placement, through offload (host layers' write-back, swap-out) and
reload (stream-in through staging, promotion back to GPU blocks), and tokens equal transformers'."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.types import Placement, SamplingParams
from tests.test_engine_reference import hf_generate, make_engine, prompt_of
from worker_svc.engine import Engine
from worker_svc.kv.offload import (
    CopyEngine,
    CopyHandle,
    DoneHandle,
    copy_each_run,
    copy_runs_batched,
    copy_runs_foreach,
    copy_runs_indexed,
)
from worker_svc.outputs import StepOutput

LAYERS = 4
CopyFn = Callable[[torch.Tensor, torch.Tensor, np.ndarray], None]


class FnCopyEngine(CopyEngine):
    """Every copy call through ``fn``; counts calls and runs."""

    def __init__(self, fn: CopyFn) -> None:
        self.fn = fn
        self.calls = self.runs = 0

    def copy_runs(self, src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray) -> CopyHandle:
        self.calls += 1
        self.runs += len(runs)
        if len(runs):
            self.fn(src, dst, runs)
        return DoneHandle()


PATHS: dict[str, CopyFn] = {"each": copy_each_run, "indexed": copy_runs_indexed,
                            "foreach": copy_runs_foreach, "batched": copy_runs_batched}


def lockstep(engines: dict[str, Engine], jobs: dict[str, tuple[list[int], int, str | None]],
             max_steps: int = 400) -> tuple[dict[str, list[int]], list[StepOutput]]:
    """Run the same requests on every engine step by step, asserting after each step that their KV
    tensors are bit-equal; the tokens of each request, and the run-by-run engine's step outputs."""
    for engine in engines.values():
        for rid, (prompt, max_tokens, letters) in jobs.items():
            placement = Placement.from_letters(letters, LAYERS) if letters else None
            engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens), placement)
    tokens: dict[str, list[int]] = {rid: [] for rid in jobs}
    first = next(iter(engines.values()))
    steps: list[StepOutput] = []
    for _ in range(max_steps):
        if not first.has_work():
            break
        outs = {name: engine.step() for name, engine in engines.items()}
        base = outs["each"]
        for name, out in outs.items():
            assert [(o.request_id, o.new_token_ids) for o in out.outputs] == \
                [(o.request_id, o.new_token_ids) for o in base.outputs], name
            assert torch.equal(engines[name].kv.gpu, engines["each"].kv.gpu), name
            assert torch.equal(engines[name].kv.host, engines["each"].kv.host), name
        steps.append(base)
        for o in base.outputs:
            tokens[o.request_id] += o.new_token_ids
    assert not any(e.has_work() for e in engines.values())
    return tokens, steps


def copied(steps: list[StepOutput]) -> int:
    """Steps that loaded or offloaded KV."""
    return sum(bool(s.stats.bytes_loaded or s.stats.bytes_offloaded) for s in steps)


@pytest.mark.parametrize("letters", ["GGGG", "GHGH", "HGHH", "HHHH"])
def test_batched_copies_move_the_same_bytes_in_every_placement(hf_and_folder: tuple[Any, Path],
                                                              letters: str) -> None:
    model, folder = hf_and_folder
    copies = {name: FnCopyEngine(fn) for name, fn in PATHS.items()}
    engines = {name: make_engine(folder, host_access="stream", block_size=4, gpu_blocks=96, host_blocks=96,
                                 max_promotions_per_step=0, copy_engine=c) for name, c in copies.items()}
    # Block size 4: prompts span several blocks (streamed in as runs), decodes cross boundaries.
    jobs = {f"r{i}": (prompt_of(n, 40 + i), m, letters) for i, (n, m) in enumerate([(9, 7), (14, 5), (5, 9)])}
    tokens, steps = lockstep(engines, jobs)
    for rid, (prompt, max_tokens, _) in jobs.items():
        assert tokens[rid] == hf_generate(model, prompt, max_tokens).token_ids
    calls = {name: (c.calls, c.runs) for name, c in copies.items()}
    assert len(set(calls.values())) == 1, calls  # the same copy calls submitted, whatever the path
    if "H" in letters:
        assert copied(steps) and copies["each"].runs > copies["each"].calls > 0
    else:
        assert copies["each"].runs == 0


def test_batched_copies_through_swap_out_and_promotion(hf_and_folder: tuple[Any, Path]) -> None:
    """A GPU tier too small for the requests' growth: swap-layers offloads layers to the host, and
    promotion reloads them once room frees up (the copies ``copy_blocks`` makes, one call each)."""
    model, folder = hf_and_folder
    engines = {name: make_engine(folder, host_access="stream", block_size=4, gpu_blocks=44, host_blocks=64,
                                 default_placement="all-gpu", preemption_mode="swap-layers",
                                 max_promotions_per_step=1, copy_engine=FnCopyEngine(fn))
               for name, fn in PATHS.items()}
    jobs = {f"r{i}": (prompt_of(n, 90 + i), m, None) for i, (n, m) in enumerate([(8, 14), (9, 24), (10, 24)])}
    tokens, steps = lockstep(engines, jobs)
    assert sum(s.stats.num_swapped_layers for s in steps) > 0  # offloaded by swap-out
    hosts = [sum(r.placement.count("H") for r in s.running) for s in steps]
    peak = hosts.index(max(hosts))
    assert max(hosts) > 0 and min(hosts[peak:]) < max(hosts)  # and some promoted back (reloaded)
    for rid, (prompt, max_tokens, _) in jobs.items():
        assert tokens[rid] == hf_generate(model, prompt, max_tokens).token_ids


@pytest.mark.parametrize("seed", range(4))
def test_batched_paths_equal_the_run_by_run_copy(seed: int) -> None:
    """Random runs (lengths 1-9, any order, overlapping none) between two tensors: every path
    writes exactly the run-by-run bytes, and nothing outside the runs."""
    rnd = np.random.default_rng(seed)
    src = torch.randn(300, 2, 4, 1, 2)
    lengths = rnd.integers(1, 10, size=20)
    dst_starts = rnd.permutation(30)[:20] * 10  # disjoint destinations, 10 blocks apart
    src_starts = rnd.integers(0, 290, size=20)
    runs = np.stack((src_starts, dst_starts, lengths), axis=1).astype(np.int64)
    want = torch.full((300, 2, 4, 1, 2), 7.0)
    copy_each_run(src, want, runs)
    for name, fn in PATHS.items():
        got = torch.full((300, 2, 4, 1, 2), 7.0)
        fn(src, got, runs)
        assert torch.equal(got, want), name
