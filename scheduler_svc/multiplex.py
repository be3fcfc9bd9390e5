"""One ``GenerateStream`` call: many tagged requests on a bidirectional stream, events coalesced.

A front end (the OpenAI gateway, a load generator, a router) sends requests with tags of its own
choosing and reads their events back tagged. Per request this is exactly ``Generate``: the same
admission (``admission.submit``), the same events (the servicer's ``_events``, so
``final_with_tokens`` and idempotent ids behave alike) and the same detach-on-break semantics
(each request is streamed through ``SchedulerCore.stream``, which cancels a request whose last
stream went away and that nobody re-attached to within the disconnect grace).

What the stream saves is the per-request gRPC call (about 200 us of server CPU each in Python
gRPC) and, since a message carries many requests, the per-request admission round: the requests
of one message are admitted in one pass of the event loop, so they wake one scheduling round
and their records ride one Redis commit. Outgoing events are coalesced: every event that one
commit made visible goes out in one ``GenerateStreamResponse``.

Backpressure: a client that stops reading stops the stream's writes (HTTP/2 flow control), and
then its outbox is bounded (``StreamLimits.outbox_events``): the pumps pause, and a paused
request's tokens wait in its state, where they are anyway (its next chunk carries them all). A
message that stays unsent for ``StreamLimits.stall_timeout_s`` cancels every request of the
stream and ends the call with RESOURCE_EXHAUSTED: a stuck client does not hold workers' blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from common.errors import InvalidArgument, LayerKVError
from common.grpc_errors import clip_details, status_of
from common.proto.layerkv.v1 import scheduler_pb2
from scheduler_svc.admission import FleetFacts, fleet_facts, submit
from scheduler_svc.core import SchedulerCore

log = logging.getLogger(__name__)

# (request id, offset, final_with_tokens) -> the request's events as GenerateResponse fields
EventSource = Callable[..., AsyncIterator[dict[str, Any]]]


@dataclass(frozen=True)
class StreamLimits:
    """How much one ``GenerateStream`` may hold for a client that does not read."""

    outbox_events: int = 1024  # events waiting for the next message; the pumps pause at this many
    stall_timeout_s: float = 30.0  # a message unsent this long: the stream's requests are cancelled

    def __post_init__(self) -> None:
        if self.outbox_events < 1:
            raise ValueError(f"outbox_events must be >= 1, got {self.outbox_events}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")


class StreamSession:
    """The state of one ``GenerateStream`` call: live tags, their pumps and the outbox."""

    def __init__(
        self,
        core: SchedulerCore,
        events: EventSource,
        limits: StreamLimits | None = None,
        context: grpc.aio.ServicerContext | None = None,
    ) -> None:
        self.core = core
        self._events = events
        self.limits = limits or StreamLimits()
        self._context = context  # to end the call with a status when the client stalls
        # live tag -> the task streaming its events (None while its admission is under way)
        self._pumps: dict[int, asyncio.Task[None] | None] = {}
        self._ids: dict[int, str] = {}  # live tag -> request id
        self._outbox: list[scheduler_pb2.TaggedEvent] = []
        self._ready = asyncio.Event()  # the outbox has events, or the reader ended
        self._room = asyncio.Event()  # the outbox is below its bound (paused pumps wait on it)
        self._room.set()
        self._background: set[asyncio.Task[Any]] = set()
        self.stalled = False  # the client stopped reading past the limit: its requests were cancelled
        self.most_queued = 0  # the most events the outbox held at once (for tests and logs)

    async def run(
        self, requests: AsyncIterator[scheduler_pb2.GenerateStreamRequest]
    ) -> AsyncIterator[scheduler_pb2.GenerateStreamResponse]:
        """The response stream: until the client half-closed and every tag has ended."""
        reader = asyncio.create_task(self._read(requests), name="generate-stream-reader")
        loop = asyncio.get_running_loop()
        handler = asyncio.current_task()
        try:
            while True:
                if self._outbox:
                    events, self._outbox = self._outbox, []
                    self._room.set()
                    # The write returns once gRPC took the message; a client that does not read
                    # keeps it from returning (flow control), and past the limit the stream ends.
                    watchdog = loop.call_later(self.limits.stall_timeout_s, self._stall, handler)
                    try:
                        yield scheduler_pb2.GenerateStreamResponse(events=events)
                    finally:
                        watchdog.cancel()
                    continue
                if reader.done():
                    reader.result()  # an undecodable message ends the call with its status
                    if not self._pumps:
                        break
                await self._ready.wait()
                self._ready.clear()
        finally:
            # A broken stream (or the end): its requests are detached, as a broken Generate's are.
            reader.cancel()
            for pump in list(self._pumps.values()):
                if pump is not None:
                    pump.cancel()

    async def _read(self, requests: AsyncIterator[scheduler_pb2.GenerateStreamRequest]) -> None:
        try:
            async for message in requests:
                for tag in message.cancel_tags:  # requests of earlier messages
                    self._cancel(tag)
                await self._admit_all(message.requests)
        finally:
            self._ready.set()

    async def _admit_all(self, tagged: Any) -> None:
        """Admit one message's requests together. A scheduler-chosen id is admitted without a
        Redis call (``submit`` returns without suspending), so those of one message all join the
        queue in this pass of the loop: one wake, one round, one commit for their records. A
        client-chosen id needs its create call: those go concurrently."""
        with_ids = []
        fleet: FleetFacts | None = None  # the workers' facts, read once for the message
        for item in tagged:
            if item.tag in self._pumps:
                self._error(item.tag, "", InvalidArgument(f"tag {item.tag} is in use on this stream"))
            elif item.request.request_id:
                self._pumps[item.tag] = None  # reserved: a duplicate in this message is refused
                with_ids.append(item)
            else:
                if fleet is None:
                    fleet = fleet_facts(self.core)
                # While Redis is away this admission awaits its create call, and the fleet may
                # change meanwhile: the next request reads it afresh.
                suspends = not self.core.store.reachable
                await self._admit(item, fleet)
                if suspends:
                    fleet = None
        if with_ids:
            await asyncio.gather(*(self._admit(item) for item in with_ids))

    async def _admit(
        self, item: scheduler_pb2.TaggedGenerateRequest, fleet: FleetFacts | None = None
    ) -> None:
        tag, request = item.tag, item.request
        try:
            admitted = await submit(self.core, request, fleet)
        except Exception as exc:  # every admission error is this request's status only
            self._pumps.pop(tag, None)
            self._error(tag, request.request_id, exc)
            return
        request_id = admitted.state.request_id
        self._ids[tag] = request_id
        self._pumps[tag] = asyncio.create_task(self._pump(tag, request_id, request.final_with_tokens))

    async def _pump(self, tag: int, request_id: str, final_with_tokens: bool) -> None:
        try:
            async for fields in self._events(request_id, 0, final_with_tokens=final_with_tokens):
                while len(self._outbox) >= self.limits.outbox_events:  # the client is behind: pause
                    self._room.clear()
                    await self._room.wait()
                self._outbox.append(scheduler_pb2.TaggedEvent(tag=tag, request_id=request_id, **fields))
                self.most_queued = max(self.most_queued, len(self._outbox))
                self._ready.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._error(tag, request_id, exc)
        finally:
            if self._pumps.get(tag) is asyncio.current_task():
                del self._pumps[tag]
                self._ids.pop(tag, None)
                self._ready.set()

    def _stall(self, handler: asyncio.Task[Any] | None) -> None:
        """A message stayed unsent past the limit: cancel every request of this stream (their blocks
        go back to the workers) and end the call with RESOURCE_EXHAUSTED."""
        self.stalled = True
        log.warning(
            "GenerateStream: the client read nothing for %.1f s; cancelling its %d requests",
            self.limits.stall_timeout_s,
            len(self._ids),
        )
        for tag in list(self._ids):
            self._cancel(tag)
        for pump in self._pumps.values():
            if pump is not None:
                pump.cancel()
        task = asyncio.create_task(self._end_stalled(handler))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _end_stalled(self, handler: asyncio.Task[Any] | None) -> None:
        """The status goes out after what the client's transport holds already (it reads them
        first), and the handler, stuck in its write, is ended."""
        details = (
            f"the client read nothing for {self.limits.stall_timeout_s:g} s; "
            "the requests of this stream were cancelled"
        )
        if self._context is not None:
            try:
                await self._context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
            except grpc.aio.AbortError:
                pass
            except Exception as exc:  # the call ended meanwhile
                log.info("GenerateStream: could not send the stall status: %s", exc)
        if handler is not None:
            handler.cancel()

    def _cancel(self, tag: int) -> None:
        request_id = self._ids.get(tag)
        if request_id is None:
            return  # not in use (unknown, or ended): nothing to cancel
        # In the background: the reader goes on with the next message; the final follows.
        task = asyncio.create_task(self._cancel_one(tag, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_one(self, tag: int, request_id: str) -> None:
        try:
            await self.core.cancel(request_id)
        except LayerKVError as exc:  # e.g. Redis away: the request runs on, its events still come
            log.warning("cancel of request %s (tag %d) failed: %s", request_id, tag, exc)

    def _error(self, tag: int, request_id: str, exc: BaseException) -> None:
        code = status_of(exc)
        if isinstance(exc, LayerKVError):
            message = str(exc) or type(exc).__name__
        else:  # a bug: logged, never shown raw
            log.error("GenerateStream request (tag %d) failed", tag, exc_info=exc)
            message = f"internal error in GenerateStream: {type(exc).__name__}"
        status = scheduler_pb2.StreamStatus(code=code.value[0], message=clip_details(message))
        self._outbox.append(scheduler_pb2.TaggedEvent(tag=tag, request_id=request_id, error=status))
        self._ready.set()
