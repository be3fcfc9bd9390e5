"""A typed client of the scheduler's request path: many requests on one ``GenerateStream`` call.

``GenerateClient`` keeps one long-lived ``GenerateStream`` per channel; each ``generate`` gets a
tag of its own and a ``RequestStream``, an async iterator of its ``Tokens`` and one ``Finished``
(a refusal raises the ``LayerKVError`` that ``Generate`` would have raised). Requests made in one
pass of the event loop go out in one message. A broken stream is reopened (once a stream of the
client has answered: an endpoint never reached fails its requests at once, as ``Generate`` does)
and its unfinished requests are resent with their ids (the scheduler's ids are idempotent: a known
id attaches to the running request and replays it from offset 0); what the client delivered
already is skipped, so no token is lost or repeated (a request the scheduler had not named yet
is sent as new; its first run, detached, ends after the scheduler's disconnect grace). A
scheduler without ``GenerateStream`` (``UNIMPLEMENTED``), or ``multiplex=False``, gets one
``Generate`` call per request. No proto object passes this module.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from common.errors import LayerKVError, Unavailable
from common.grpc_errors import error_from_rpc, error_from_status
from common.proto.layerkv.v1 import scheduler_pb2, scheduler_pb2_grpc
from common.types import FinishReason, SamplingParams
from common.wire import FINISH_FROM_PROTO, sampling_to_proto

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
# A stream failing with one of these failed as a whole for a reason a retry does not change (a
# request's own refusal, a full queue included, comes as its tagged status, never as these).
_FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # e.g. a message over the size limit
    grpc.StatusCode.UNIMPLEMENTED,  # after the stream had answered: not an older scheduler
}

# How many times a client's first stream is reopened after INTERNAL before any answer (then the
# client goes per call).
_EARLY_INTERNAL = 2


@dataclass(frozen=True)
class GenerateJob:
    """One request to generate."""

    prompt: str | tuple[int, ...]  # text (tokenized by the scheduler) or token ids
    sampling: SamplingParams
    request_id: str = ""  # client-chosen (a retry attaches to the first run); "": the scheduler's
    expected_output_tokens: int = 0  # the client's estimate of its output length (0: not given)
    ttft_slo_s: float | None = None  # the request's SLOs (None: not sent)
    tpot_slo_s: float | None = None


@dataclass(frozen=True)
class Tokens:
    """New tokens of a request, in order: ``offset`` is the position of the first in its output."""

    offset: int
    token_ids: tuple[int, ...]
    text: str  # their detokenized text (may hold back an incomplete character until later)
    # time.monotonic() when the message carrying them was read off the call (before any queue):
    # what a client timing its requests takes as their arrival
    received_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Finished:
    """The last event of a request, as the scheduler recorded it."""

    finish_reason: FinishReason | None  # None: unspecified (an older scheduler)
    prompt_tokens: int
    output_tokens: int
    queue_s: float  # arrival to first dispatch
    ttft_s: float  # arrival to first token
    latency_s: float  # arrival to finish
    tpot_s: float  # mean time per output token after the first
    error: str = ""  # why the worker failed it (finish_reason ERROR)
    received_s: float = field(default=0.0, compare=False)  # as Tokens.received_s (0: ended here)


Event = Tokens | Finished


@dataclass(eq=False)
class _Live:
    """A request the client has not seen end."""

    tag: int
    job: GenerateJob
    request_id: str  # the job's, or the scheduler's once an event named it
    queue: asyncio.Queue[Event | LayerKVError] = field(default_factory=asyncio.Queue)
    tokens_seen: int = 0  # tokens delivered to the consumer
    text_seen: int = 0  # characters of text delivered
    replayed_text: int = 0  # characters of text the current call has sent (it starts at offset 0)
    written: bool = False  # sent on the current call
    cancelled: bool = False  # its cancel was sent (its abort final is on the way)
    call_task: asyncio.Task[None] | None = None  # its Generate call, on the per-call path


class RequestStream:
    """One request's events: ``Tokens`` as they come, then one ``Finished``; a refusal raises."""

    def __init__(self, client: GenerateClient, live: _Live) -> None:
        self._client, self._live, self._ended = client, live, False

    @property
    def request_id(self) -> str:
        """The request's id: the job's, else the scheduler's once its first event came ("" before)."""
        return self._live.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        item = await self._live.queue.get()
        if isinstance(item, LayerKVError):
            self._ended = True
            raise item
        self._ended = isinstance(item, Finished)
        return item

    def cancel(self) -> None:
        """Cancel this request on the scheduler (its ``Finished``, reason ABORT, still follows)."""
        self._client.cancel(self._live)


class GenerateClient:
    """Requests over one channel; ``multiplex=False`` makes one ``Generate`` call each."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: Sequence[tuple[str, str]] = (),
        *,
        multiplex: bool = True,
        reconnect_s: float = 30.0,
    ) -> None:
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        self._metadata = tuple(metadata)
        self.multiplex = multiplex  # False after the scheduler answered UNIMPLEMENTED
        self.reconnect_s = reconnect_s  # how long a broken stream is retried before requests fail
        self.stream_calls = 0  # GenerateStream calls opened (the first and each reconnect)
        self._answered = False  # a stream of this client has delivered a response (so it can again)
        self._tags = itertools.count(1)
        self._live: dict[int, _Live] = {}
        self._cancels: list[int] = []  # tags to cancel in the next message
        self._wake = asyncio.Event()  # something to write
        self._runner: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def generate(self, job: GenerateJob) -> RequestStream:
        live = _Live(next(self._tags), job, job.request_id)
        self._live[live.tag] = live
        if self.multiplex:
            self._wake.set()
            if self._runner is None or self._runner.done():
                self._runner = asyncio.create_task(self._run(), name="generate-stream-client")
        else:
            live.call_task = asyncio.create_task(self._per_call(live))
        return RequestStream(self, live)

    def cancel(self, live: _Live) -> None:
        if self._live.get(live.tag) is not live:
            return  # ended already
        if live.call_task is not None:  # per-call: end the call, and cancel by id if it has one
            live.call_task.cancel()
            self._end(live, Finished(FinishReason.ABORT, 0, live.tokens_seen, 0.0, 0.0, 0.0, 0.0))
            if live.request_id:
                self._spawn(self._cancel_by_id(live.request_id))
        elif live.written:
            live.cancelled = True
            self._cancels.append(live.tag)
            self._wake.set()
        else:  # never sent: nothing runs on the scheduler
            self._end(live, Finished(FinishReason.ABORT, 0, 0, 0.0, 0.0, 0.0, 0.0))

    async def close(self) -> None:
        """End the stream and every request still open (their iterators raise ``Unavailable``)."""
        for task in [self._runner, *(live.call_task for live in self._live.values())]:
            if task is not None:
                task.cancel()
        for live in list(self._live.values()):
            self._end(live, Unavailable("the client was closed"))
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    # -- the multiplexed path ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._keep_streaming()
        except Exception as exc:  # a bug here must not leave the requests' consumers waiting
            log.exception("the GenerateStream client failed")
            for live in list(self._live.values()):
                self._end(live, LayerKVError(f"internal error in the stream client: {type(exc).__name__}"))

    async def _keep_streaming(self) -> None:
        """Keep one stream open while requests are live: reopen it when it breaks."""
        loop = asyncio.get_running_loop()
        broken_since: float | None = None
        delay = 0.05
        early_internal = 0  # first streams that failed INTERNAL before any answer (see below)
        while self._live:
            call = self._stub.GenerateStream(metadata=self._metadata)
            self.stream_calls += 1
            for live in list(self._live.values()):  # a new call: every open request is sent again
                if live.cancelled:  # the broken call detached it: the scheduler's grace ends it
                    self._end(live, Finished(FinishReason.ABORT, 0, live.tokens_seen, 0.0, 0.0, 0.0, 0.0))
                live.written, live.replayed_text = False, 0
            self._cancels.clear()
            self._wake.set()
            writer = asyncio.create_task(self._write(call))
            got_any = False
            try:
                while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    got_any, broken_since, delay = True, None, 0.05
                    self._answered = True
                    received = time.monotonic()
                    for event in response.events:
                        self._dispatch(event, received)
                return  # the scheduler ended the call (it only does so after we half-close)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                # A scheduler without GenerateStream answers UNIMPLEMENTED, but when its status
                # races the client's first write, grpc fails the call INTERNAL ("Internal error
                # from Core"; 2.5-7.5 % of fresh channels to a sync server here, some again and
                # again): a stream never answered is reopened for that, and after a few such
                # failures the client goes per call, which every scheduler serves.
                early = code == grpc.StatusCode.INTERNAL and not self._answered
                if early and early_internal < _EARLY_INTERNAL:
                    early_internal += 1
                    log.info("GenerateStream failed INTERNAL before an answer (%s): reopening", err.details())
                    continue
                if (code == grpc.StatusCode.UNIMPLEMENTED and not got_any) or early:
                    log.info("the scheduler has no GenerateStream: one Generate call per request")
                    self.multiplex = False
                    for live in self._live.values():
                        live.call_task = asyncio.create_task(self._per_call(live))
                    return
                now = loop.time()
                broken_since = now if broken_since is None else broken_since
                # A scheduler never reached fails the requests at once, as a Generate call would.
                if code in _FATAL or not self._answered or now - broken_since > self.reconnect_s:
                    for live in list(self._live.values()):
                        self._end(live, error_from_rpc(err))
                    return
                log.info("GenerateStream broke (%s): reopening for %d requests", code.name, len(self._live))
            finally:
                writer.cancel()
                call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        """Send what ``generate`` and ``cancel`` queued, everything queued meanwhile in one message."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            fresh = [live for live in self._live.values() if not live.written]
            message = scheduler_pb2.GenerateStreamRequest(cancel_tags=self._cancels)
            self._cancels = []
            for live in fresh:
                live.written = True
                message.requests.add(tag=live.tag, request=wire_request(live.job, live.request_id))
            if message.requests or message.cancel_tags:
                try:
                    await call.write(message)
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    return  # the call broke: the reader sees why and reopens

    def _dispatch(self, event: scheduler_pb2.TaggedEvent, received: float) -> None:
        live = self._live.get(event.tag)
        if live is None:
            return  # ended here already (cancelled before it was sent, or the client closed)
        live.request_id = event.request_id or live.request_id
        kind = event.WhichOneof("event")
        if kind == "chunk":
            self._take(live, event.chunk, received)
        elif kind == "final":
            self._finish(live, event.final, received)
        elif kind == "error":
            code = _CODES.get(event.error.code, grpc.StatusCode.UNKNOWN)
            self._end(live, error_from_status(code, event.error.message))

    # -- the per-call path -----------------------------------------------------------------------

    async def _per_call(self, live: _Live) -> None:
        try:
            call = self._stub.Generate(wire_request(live.job, live.request_id), metadata=self._metadata)
            async for msg in call:
                received = time.monotonic()
                live.request_id = msg.request_id or live.request_id
                if msg.HasField("chunk"):
                    self._take(live, msg.chunk, received)
                elif msg.HasField("final"):
                    self._finish(live, msg.final, received)
        except grpc.aio.AioRpcError as err:
            self._end(live, error_from_rpc(err))
        except Exception as exc:
            log.exception("a Generate call of the client failed")
            self._end(live, LayerKVError(f"internal error in the stream client: {type(exc).__name__}"))

    async def _cancel_by_id(self, request_id: str) -> None:
        try:
            await self._stub.Cancel(scheduler_pb2.CancelRequest(request_id=request_id),
                                    metadata=self._metadata)  # fmt: skip
        except grpc.aio.AioRpcError as err:  # the scheduler cancels it after its grace anyway
            log.warning("cancel of request %s failed: %s", request_id, error_from_rpc(err))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- both paths ------------------------------------------------------------------------------

    def _take(self, live: _Live, chunk: scheduler_pb2.TokenChunk, received: float) -> None:
        """Deliver what of ``chunk`` the consumer has not had (a resent request replays from 0)."""
        ids = chunk.token_ids
        fresh_ids = tuple(ids[max(0, live.tokens_seen - chunk.offset):])
        live.replayed_text += len(chunk.text_delta)
        unseen = live.replayed_text - live.text_seen
        text = chunk.text_delta[len(chunk.text_delta) - unseen:] if unseen > 0 else ""
        if not fresh_ids and not text:
            return
        offset = max(chunk.offset, live.tokens_seen)
        assert offset == live.tokens_seen or not fresh_ids, (offset, live.tokens_seen)
        live.tokens_seen = max(live.tokens_seen, chunk.offset + len(ids))
        live.text_seen += len(text)
        live.queue.put_nowait(Tokens(offset, fresh_ids, text, received))

    def _finish(self, live: _Live, final: scheduler_pb2.GenerateFinal, received: float) -> None:
        if final.HasField("last_chunk"):
            self._take(live, final.last_chunk, received)
        self._end(live, Finished(
            FINISH_FROM_PROTO.get(final.finish_reason), final.prompt_tokens, final.output_tokens,
            final.queue_s, final.ttft_s, final.latency_s, final.tpot_s, final.error, received,
        ))  # fmt: skip

    def _end(self, live: _Live, last: Finished | LayerKVError) -> None:
        if self._live.get(live.tag) is live:
            del self._live[live.tag]
            live.queue.put_nowait(last)


def wire_request(job: GenerateJob, request_id: str = "") -> scheduler_pb2.GenerateRequest:
    """The ``GenerateRequest`` of ``job`` (both paths send the same one). ``final_with_tokens``:
    the last tokens ride in the final (an older scheduler ignores it and sends a chunk)."""
    request = scheduler_pb2.GenerateRequest(
        request_id=request_id, sampling=sampling_to_proto(job.sampling),
        expected_output_tokens=job.expected_output_tokens, final_with_tokens=True,
    )  # fmt: skip
    if job.ttft_slo_s is not None:
        request.slo.ttft_s = job.ttft_slo_s
    if job.tpot_slo_s is not None:
        request.slo.tpot_s = job.tpot_slo_s
    if isinstance(job.prompt, str):
        request.text = job.prompt
    else:
        request.token_ids.ids.extend(job.prompt)
    return request
