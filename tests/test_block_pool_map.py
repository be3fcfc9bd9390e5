"""``BlockPool``'s free map after random allocations and frees (fragmented and not) equals the one
built from scratch from the ids held, and ids come out distinct: the one-run slice write of
``allocate`` marks exactly the ids it hands out."""

from __future__ import annotations

import random

import numpy as np
import pytest

from worker_svc.kv.block_pool import BlockPool


@pytest.mark.parametrize("seed", range(4))
def test_free_map_matches_the_ids_held(seed: int) -> None:
    rng = random.Random(seed)
    pool = BlockPool(300, first_id=7)
    held: list[list[int]] = []
    slices = 0
    for _ in range(400):
        if held and rng.random() < 0.45:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(0, 40)
            ids = pool.allocate(n)
            if ids is None:
                assert n > pool.num_free
                continue
            assert len(ids) == n
            slices += n > 1 and max(ids) - min(ids) == n - 1
            held.append(ids)
        taken = [i for ids in held for i in ids]
        assert len(set(taken)) == len(taken), "an id handed out twice"
        want = np.ones(300, dtype=np.bool_)
        want[np.array(taken, dtype=np.int64) - 7] = False
        assert np.array_equal(pool._is_free, want)
        assert pool.num_free == 300 - len(taken)
    assert slices > 20  # both paths ran: one-run allocations and fragmented ones
    with pytest.raises(AssertionError, match="freed twice"):
        ids = pool.allocate(3)
        assert ids is not None
        pool.free(ids)
        pool.free(ids[:1])
