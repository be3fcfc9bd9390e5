"""One request inside the scheduler: its persisted record, its token log, and the client stream.

``RequestState`` is the in-memory twin of the Redis record; clients (``Generate`` and every
``Attach``) stream from its token list, each from its own offset, so a re-attached client gets
exactly the tokens it has not seen. Streams see only what is saved: tokens and the final message
become visible when ``publish()`` is called after the Redis commit that holds them (persist before
send), so a scheduler crash can never regenerate a continuation other than the one a client saw.
The worker-side id of a dispatch is ``<id>@<attempt>``: after a
requeue the new attempt has a new id, and events of an old attempt are recognised as stale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from common.store import RequestRecord
from common.tokenizer import IncrementalDetokenizer, Tokenizer
from common.types import FinishReason, SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


def worker_request_id(request_id: str, attempt: int) -> str:
    return f"{request_id}@{attempt}"


def split_worker_request_id(worker_id: str) -> tuple[str, int]:
    """``"abc@2"`` → ``("abc", 2)``; an id without an attempt is attempt -1 (never ours)."""
    base, sep, attempt = worker_id.rpartition("@")
    if not sep or not attempt.isdigit():
        return worker_id, -1
    return base, int(attempt)


def sampling_to_dict(sampling: SamplingParams) -> dict[str, object]:
    return {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": sampling.seed,
        "stop_token_ids": list(sampling.stop_token_ids),
        "ignore_eos": sampling.ignore_eos,
    }


def sampling_from_dict(data: dict[str, object]) -> SamplingParams:
    stop = data.get("stop_token_ids") or []
    assert isinstance(stop, list), f"stored stop_token_ids must be a list, got {stop!r}"
    return SamplingParams(
        max_tokens=int(str(data["max_tokens"])),
        temperature=float(str(data["temperature"])),
        top_p=float(str(data["top_p"])),
        top_k=int(str(data["top_k"])),
        seed=None if data.get("seed") is None else int(str(data["seed"])),
        stop_token_ids=tuple(int(t) for t in stop),
        ignore_eos=bool(data.get("ignore_eos")),
    )


@dataclass(frozen=True)
class StreamChunk:
    """New output tokens for one client."""

    offset: int  # index of the first of these tokens in the output
    token_ids: tuple[int, ...]
    text_delta: str


@dataclass(frozen=True)
class StreamFinal:
    """The end of a request's stream."""

    record: RequestRecord


@dataclass(eq=False)
class RequestState:
    """A live request: the record, the output tokens so far, and a wake-up for its streams."""

    record: RequestRecord
    sampling: SamplingParams
    tokens: list[int] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    published: int = -1  # tokens streams may send (saved in Redis); -1: all given at construction
    closed: bool = False  # the final message may be sent (the finish is saved)
    streams: int = 0  # client streams attached now
    # Its worker reported this attempt's end (finished there): nothing is left there to abort.
    ended_on_worker: bool = False

    def __post_init__(self) -> None:
        # Built from Redis (recovery, a finished request) or new: everything it holds is saved.
        if self.published < 0:
            self.published = len(self.tokens)
        self.closed = self.finished

    @property
    def request_id(self) -> str:
        return self.record.request_id

    @property
    def finished(self) -> bool:
        return self.record.status == FINISHED

    @property
    def worker_request_id(self) -> str:
        return worker_request_id(self.request_id, self.record.requeues)

    @property
    def remaining_tokens(self) -> int:
        return self.sampling.max_tokens - len(self.tokens)

    @property
    def context_len(self) -> int:
        """``len(context_ids)``, without building the list."""
        return len(self.record.prompt_ids) + len(self.tokens)

    @property
    def context_ids(self) -> list[int]:
        """What a (re)dispatch sends as its prompt: the prompt plus every token already streamed."""
        return [*self.record.prompt_ids, *self.tokens]

    def notify(self) -> None:
        """Wake every stream of this request (they re-check tokens and status)."""
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def publish(self, saved_tokens: int | None, finish_saved: bool) -> None:
        """A commit saved the token log up to ``saved_tokens`` (None: no tokens) and, with
        ``finish_saved``, the finish: let the streams send that much."""
        published = max(self.published, saved_tokens or 0)
        closed = self.closed or (finish_saved and self.finished)
        if (published, closed) != (self.published, self.closed):
            self.published, self.closed = published, closed
            self.notify()

    def finish(self, reason: FinishReason, error: str = "", now: float | None = None) -> None:
        record = self.record
        record.status = FINISHED
        record.finish_reason = reason.value
        record.error = error
        record.finish_time = now if now is not None else time.time()
        record.output_tokens = len(self.tokens)


async def stream_from(
    state: RequestState, offset: int, tokenizer: Tokenizer | None
) -> AsyncIterator[StreamChunk | StreamFinal]:
    """Chunks from ``offset`` on as they are saved, then the final message once the finish is."""
    detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
    if detokenizer is not None and offset:
        detokenizer.push(state.tokens[:offset])  # context, so the first delta is decoded correctly
    position = offset
    while True:
        changed = state.changed  # taken before checking, so no notification slips between
        if position < state.published:
            new = state.tokens[position : state.published]
            text = detokenizer.push(new) if detokenizer is not None else ""
            yield StreamChunk(position, tuple(new), text)
            position += len(new)
            continue
        if state.closed and position >= len(state.tokens):
            tail = detokenizer.flush() if detokenizer is not None else ""
            if tail:  # text held back as an incomplete character: the output ends here
                yield StreamChunk(position, (), tail)
            yield StreamFinal(state.record)
            return
        await changed.wait()


def stored_stream(
    record: RequestRecord, all_tokens: list[int], offset: int, tokenizer: Tokenizer | None
) -> list[StreamChunk | StreamFinal]:
    """The rest of a finished request's stream, from Redis (it is no longer in memory)."""
    out: list[StreamChunk | StreamFinal] = []
    rest = all_tokens[offset:]
    if rest:
        text = ""
        if tokenizer is not None:
            detokenizer = IncrementalDetokenizer(tokenizer)
            detokenizer.push(all_tokens[:offset])
            text = detokenizer.push(rest) + detokenizer.flush()
        out.append(StreamChunk(offset, tuple(rest), text))
    out.append(StreamFinal(record))
    return out
