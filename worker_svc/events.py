"""Fan-out of the engine's per-step events to the StreamEvents subscribers (usually one scheduler).

Runs on the event loop only. Each subscriber has its own queue, so a slow one never delays the
engine or the others. Events that carry tokens or admissions while nobody listens (the scheduler is
restarting, or reconnecting after a network blip) are kept in a bounded backlog and handed to the
next subscriber, so no token is lost across a scheduler restart.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from common.proto.layerkv.v1 import worker_pb2

log = logging.getLogger(__name__)

# Events kept while nobody subscribes; at one event per step this covers minutes of decoding
# (each event carries the running list, so the bound also caps the memory it can take).
BACKLOG_LIMIT = 20_000


class EventHub:
    """Broadcasts StreamEventsResponse messages; remembers the latest worker state."""

    def __init__(
        self, initial_state: worker_pb2.StreamEventsResponse, backlog_limit: int = BACKLOG_LIMIT
    ) -> None:
        self._subscribers: set[asyncio.Queue[worker_pb2.StreamEventsResponse | None]] = set()
        self._backlog: collections.deque[worker_pb2.StreamEventsResponse] = collections.deque()
        self._backlog_limit = backlog_limit
        self._dropped = 0
        # The latest running requests and block usage: the first event every subscriber gets, and
        # the idle heartbeat (a state-only message, no tokens). Built from the latest event only
        # when asked for (a subscribe, a heartbeat, an admission), not at every step: copying the
        # running list and the per-layer usage into a new message was loop work on every step,
        # and the loop's work is time the engine thread waits for the GIL.
        self._state: worker_pb2.StreamEventsResponse | None = initial_state
        self._latest = initial_state

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def state(self) -> worker_pb2.StreamEventsResponse:
        """A state-only message (``step.kind`` idle, no tokens) of the latest published event."""
        if self._state is None:
            event = self._latest
            self._state = worker_pb2.StreamEventsResponse(
                running=event.running, gpu=event.gpu, host=event.host,
                step=worker_pb2.StepReport(kind="idle"), waiting_request_ids=event.waiting_request_ids,
            )
        return self._state

    def publish(self, event: worker_pb2.StreamEventsResponse) -> None:
        """Send ``event`` to every subscriber (it must not be changed afterwards: it is queued)."""
        self._latest, self._state = event, None
        if not self._subscribers:
            if event.tokens or event.admitted_request_ids or event.preempted_request_ids:
                if len(self._backlog) >= self._backlog_limit:
                    self._backlog.popleft()
                    self._dropped += 1
                    if self._dropped == 1:
                        log.warning("no StreamEvents subscriber: dropping the oldest buffered events")
                self._backlog.append(event)
            return
        for q in self._subscribers:
            q.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[worker_pb2.StreamEventsResponse | None]:
        """A queue that starts with any backlog, then the current state, then every new event."""
        q: asyncio.Queue[worker_pb2.StreamEventsResponse | None] = asyncio.Queue()
        while self._backlog:
            q.put_nowait(self._backlog.popleft())
        q.put_nowait(self.state)
        self._dropped = 0
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[worker_pb2.StreamEventsResponse | None]) -> None:
        self._subscribers.discard(q)

    def close(self) -> None:
        """End every subscription (server shutdown)."""
        for q in self._subscribers:
            q.put_nowait(None)
        self._subscribers.clear()
