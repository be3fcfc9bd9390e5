"""A pool of block ids of one tier (ids only, no tensors).

Ids come out in ascending order from a fresh pool, so a request's blocks of one layer are usually a
contiguous run and can be copied between tiers as one large copy. "No room" is a ``None`` return.
The free ids live in an ``array`` and a byte map rather than a list and a set: a tier can hold
millions of blocks, and Python's garbage collector walks every element of a list or set on each
full collection (it never looks inside an array), which cost whole steps tens of milliseconds.
"""

from __future__ import annotations

from array import array

import numpy as np


class BlockPool:
    """Free-list of the ids ``first_id .. first_id + num_blocks - 1``."""

    def __init__(self, num_blocks: int, first_id: int = 0) -> None:
        assert num_blocks >= 0, f"a pool cannot have {num_blocks} blocks"
        self.num_blocks = num_blocks
        self.first_id = first_id
        # A stack whose top is the lowest id: pops give ascending, contiguous runs while unfragmented.
        self._free = array("q", range(first_id + num_blocks - 1, first_id - 1, -1))
        self._is_free = np.ones(num_blocks, dtype=np.bool_)  # [num_blocks], by id - first_id

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` block ids, or ``None`` (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        top = len(self._free) - n
        taken = self._free[top:]  # a copy: the top of the stack, lowest id last
        del self._free[top:]
        taken.reverse()  # lowest id first
        low = min(taken)
        if max(taken) - low == n - 1:  # n distinct ids spanning n: one run (an unfragmented pool)
            self._is_free[low - self.first_id:low - self.first_id + n] = False  # a slice, no index
        else:  # [n] a view of the array: no list-to-array conversion of the ids
            self._is_free[np.frombuffer(taken, dtype=np.int64) - self.first_id] = False
        return taken.tolist()

    def free(self, ids: list[int]) -> None:
        if not ids:
            return
        at = np.array(ids, dtype=np.int64) - self.first_id  # [n]
        bad = at[(at < 0) | (at >= self.num_blocks)]
        assert not bad.size, f"block {int(bad[0]) + self.first_id} is not from this pool"
        twice = at[self._is_free[at]]
        assert not twice.size, f"blocks {sorted((twice + self.first_id).tolist())} freed twice"
        self._is_free[at] = True
        self._free.extend(sorted(ids, reverse=True))
