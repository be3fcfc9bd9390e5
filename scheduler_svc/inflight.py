"""Prefills dispatched but not yet reported running: the policy's view of work in flight.

A worker lists a request as running only once its prefill has produced the first token, so for a
few steps (longer when the worker's events lag) a dispatched prefill is in no report, yet it will
stall every decode on that worker. A round would then see the same slack again and admit a second
prefill that only fits alone. This tracker remembers each dispatched attempt from the round that
reserved it until the worker reports it running, or until the attempt stops being live there
(finished, refused, requeued, its worker lost); rounds hand them to the policy as
``WorkerSnapshot.prefilling``. Their blocks are the ledger's (reserved, then held); this module only
keeps the prefill's identity, so the slack is charged once: as in flight, then in T_past.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from scheduler_svc.policies.base import PrefillInFlight
from scheduler_svc.worker_events import RunningReport


class InflightPrefills:
    """Per worker, the dispatched attempts (worker-side ids) whose prefill is not reported done."""

    def __init__(self) -> None:
        self._by_worker: dict[str, dict[str, PrefillInFlight]] = {}  # insertion order: oldest first

    def add(self, worker_id: str, worker_request_id: str, prefill: PrefillInFlight) -> None:
        """A dispatch was reserved (O(1)); a repeated id replaces the earlier entry."""
        self._by_worker.setdefault(worker_id, {})[worker_request_id] = prefill

    def of(
        self,
        worker_id: str,
        running: Sequence[RunningReport],
        live: Callable[[str, str], bool],
    ) -> tuple[PrefillInFlight, ...]:
        """The worker's prefills still in flight, forgetting the ones that are not any more.

        ``running``: the worker's latest running list (their prefill is done);
        ``live(worker_id, worker_request_id)``: whether that attempt is still the request's live
        attempt on that worker (not finished, refused, requeued or moved).
        """
        entries = self._by_worker.get(worker_id)
        if not entries:
            return ()
        reported = {r.worker_request_id for r in running}
        done = [rid for rid in entries if rid in reported or not live(worker_id, rid)]
        for rid in done:
            del entries[rid]
        if not entries:
            del self._by_worker[worker_id]
            return ()
        return tuple(entries.values())

    def forget_worker(self, worker_id: str) -> None:
        """Drop a worker's entries (also done lazily by ``of`` once its requests are requeued)."""
        self._by_worker.pop(worker_id, None)

    def __len__(self) -> int:
        return sum(len(e) for e in self._by_worker.values())
