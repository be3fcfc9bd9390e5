"""The vectorised host paths give what the plain loops gave: run finding for block copies, copies of
many runs (gather/scatter) and of few (slice copies), and the array-backed block pool's checks."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from worker_svc.kv.block_pool import BlockPool
from worker_svc.kv.offload import CopyEngine, CopyRun, coalesce


def loop_coalesce(src: list[int], dst: list[int]) -> list[CopyRun]:
    runs: list[CopyRun] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1].src + runs[-1].length == s and runs[-1].dst + runs[-1].length == d:
            runs[-1] = CopyRun(runs[-1].src, runs[-1].dst, runs[-1].length + 1)
        else:
            runs.append(CopyRun(s, d, 1))
    return runs


@pytest.mark.parametrize("n", [0, 1, 2, 16, 17, 300])
def test_coalesce_equals_the_loop(n: int) -> None:
    rnd = random.Random(n)
    for _ in range(20):
        src = list(itertools.accumulate(rnd.choice([1, 1, 1, 4]) for _ in range(n)))
        dst = list(itertools.accumulate(rnd.choice([1, 1, 2, -5]) for _ in range(n)))
        assert coalesce(src, dst) == loop_coalesce(src, dst)


@pytest.mark.parametrize("runs", [3, 40])  # few: slice copies; many: one gather and one scatter
def test_copy_blocks_moves_exactly_the_named_blocks(runs: int) -> None:
    src = torch.randn(200, 2, 4, 1, 2)
    dst = torch.zeros(200, 2, 4, 1, 2)
    src_ids = [3 * i for i in range(runs)] + [150, 151, 152]
    dst_ids = [199 - i for i in range(runs)] + [10, 11, 12]
    CopyEngine().copy_blocks(src, src_ids, dst, dst_ids)
    want = torch.zeros_like(dst)
    want[dst_ids] = src[src_ids]
    assert torch.equal(dst, want)


def test_block_pool_refuses_foreign_and_double_frees() -> None:
    pool = BlockPool(8, first_id=4)
    ids = pool.allocate(3)
    assert ids == [4, 5, 6] and pool.num_free == 5 and pool.allocate(0) == []
    with pytest.raises(AssertionError, match="not from this pool"):
        pool.free([12])
    with pytest.raises(AssertionError, match=r"freed twice"):
        pool.free([7])  # never taken
    pool.free(ids)
    with pytest.raises(AssertionError, match=r"\[4, 5\] freed twice"):
        pool.free([4, 5])
    assert pool.num_free == 8 and pool.allocate(8) == list(range(4, 12))
