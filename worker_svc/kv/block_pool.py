"""A pool of block ids of one tier (ids only, no tensors).

Ids come out in ascending order from a fresh pool, so a request's blocks of one layer are usually a
contiguous run and can be copied between tiers as one large copy. "No room" is a ``None`` return.
"""

from __future__ import annotations


class BlockPool:
    """Free-list of the ids ``first_id .. first_id + num_blocks - 1``."""

    def __init__(self, num_blocks: int, first_id: int = 0) -> None:
        assert num_blocks >= 0, f"a pool cannot have {num_blocks} blocks"
        self.num_blocks = num_blocks
        self.first_id = first_id
        # A stack whose top is the lowest id: pops give ascending, contiguous runs while unfragmented.
        self._free: list[int] = list(range(first_id + num_blocks - 1, first_id - 1, -1))
        self._free_set = set(self._free)

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
        ids = self._free[len(self._free) - n:][::-1]  # the top of the stack, lowest id first
        del self._free[len(self._free) - n:]
        self._free_set.difference_update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        if not ids:
            return
        low, high = min(ids), max(ids)
        assert self.first_id <= low and high < self.first_id + self.num_blocks, \
            f"block {low if low < self.first_id else high} is not from this pool"
        assert self._free_set.isdisjoint(ids), \
            f"blocks {sorted(self._free_set.intersection(ids))} freed twice"
        self._free.extend(sorted(ids, reverse=True))
        self._free_set.update(ids)
