"""The waiting queue: requests not yet dispatched, in arrival order, with a size limit.

A new request past the limit is refused with ``ResourceExhausted``; a requeued request (its worker
failed or refused it) always gets back in, at its original arrival position, because it was
already accepted once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from common.errors import ResourceExhausted


class WaitingQueue:
    """Request ids ordered by (arrival time, admission sequence)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"queue limit must be >= 1, got {limit}")
        self.limit = limit
        self._keys: list[tuple[float, int, str]] = []
        self._key_of: dict[str, tuple[float, int, str]] = {}
        self._seq = 0

    def push(self, request_id: str, arrival_time: float, requeue: bool = False) -> None:
        """Add a request; a new one beyond the limit raises ``ResourceExhausted``."""
        if request_id in self._key_of:
            return
        if not requeue and len(self._keys) >= self.limit:
            raise ResourceExhausted(
                f"waiting queue is full ({self.limit} requests, --queue-limit); retry later"
            )
        self._seq += 1
        key = (arrival_time, self._seq, request_id)
        bisect.insort(self._keys, key)
        self._key_of[request_id] = key

    def remove(self, request_id: str) -> bool:
        key = self._key_of.pop(request_id, None)
        if key is None:
            return False
        index = bisect.bisect_left(self._keys, key)
        assert self._keys[index] == key, f"waiting queue out of order at {request_id}"
        del self._keys[index]
        return True

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._key_of

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter([k[2] for k in self._keys])
