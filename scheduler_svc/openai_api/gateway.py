"""The small typed interface between the HTTP API and the scheduler's request path.

``CoreGateway`` submits through ``scheduler_svc.admission.submit`` (validation, tokenization,
idempotent ids, queue limit), streams from the request's live token log or from Redis, and cancels
through ``SchedulerCore.cancel``, exactly as the gRPC ``SchedulerService`` does, so queueing,
policies, persistence and failover hold for HTTP clients too. Nothing else of the core is touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from common.errors import NotFound
from common.proto.layerkv.v1 import scheduler_pb2
from common.tokenizer import Tokenizer
from common.types import SamplingParams
from common.wire import sampling_to_proto
from scheduler_svc.admission import lookup, submit
from scheduler_svc.core import SchedulerCore
from scheduler_svc.requests import StreamChunk, StreamFinal, stored_stream

log = logging.getLogger(__name__)

StreamItem = StreamChunk | StreamFinal


@dataclass(frozen=True)
class ServedModel:
    """A model id the API accepts, and the longest context (prompt plus output) it serves."""

    id: str
    max_model_len: int


@dataclass(frozen=True)
class Submitted:
    """An admitted request: its id and the length of its tokenized prompt."""

    request_id: str
    prompt_tokens: int


@dataclass(frozen=True)
class Health:
    serving: bool
    reason: str = ""


class RequestGateway(Protocol):
    """What the HTTP API needs from a scheduler."""

    @property
    def default_max_tokens(self) -> int: ...

    def health(self) -> Health: ...

    def tokenizer(self) -> Tokenizer | None: ...

    def models(self) -> list[ServedModel]: ...

    def accepts_model(self, name: str) -> bool: ...

    async def submit(
        self, prompt: str | list[int], sampling: SamplingParams, expected_output_tokens: int = 0
    ) -> Submitted: ...

    def stream(self, request_id: str) -> AsyncIterator[StreamItem]: ...

    def is_finished(self, request_id: str) -> bool: ...

    async def cancel(self, request_id: str) -> bool: ...

    def cancel_soon(self, request_id: str) -> None: ...


class CoreGateway:
    """``RequestGateway`` over a running ``SchedulerCore``."""

    def __init__(self, core: SchedulerCore, served_model_name: str = "") -> None:
        self._core = core
        self._served_name = served_model_name
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def default_max_tokens(self) -> int:
        return self._core.settings.default_max_tokens

    def _workers(self) -> list[tuple[str, int]]:
        return [
            (h.description.model, h.description.max_model_len)
            for h in self._core.pool.handles()
            if h.accepting and h.description is not None
        ]

    def health(self) -> Health:
        if self._core.stopped:
            return Health(False, "the scheduler is stopping")
        if not self._workers():
            return Health(False, "no healthy worker is connected")
        return Health(True)

    def tokenizer(self) -> Tokenizer | None:
        return next((h.tokenizer for h in self._core.pool.handles() if h.tokenizer is not None), None)

    def models(self) -> list[ServedModel]:
        workers = self._workers()
        if self._served_name:
            return [ServedModel(self._served_name, max((n for _, n in workers), default=0))]
        longest: dict[str, int] = {}
        for model, max_len in workers:
            longest[model] = max(longest.get(model, 0), max_len)
        return [ServedModel(m, n) for m, n in sorted(longest.items())]

    def accepts_model(self, name: str) -> bool:
        return name == self._served_name or any(name == model for model, _ in self._workers())

    async def submit(
        self, prompt: str | list[int], sampling: SamplingParams, expected_output_tokens: int = 0
    ) -> Submitted:
        request = scheduler_pb2.GenerateRequest(
            sampling=sampling_to_proto(sampling), expected_output_tokens=expected_output_tokens
        )
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        admitted = await submit(self._core, request)
        return Submitted(admitted.state.request_id, len(admitted.state.record.prompt_ids))

    async def stream(self, request_id: str) -> AsyncIterator[StreamItem]:
        state = await lookup(self._core, request_id)
        if state is None:
            raise NotFound(f"unknown request id {request_id!r}")
        if self._core.requests.get(request_id) is state:
            async for item in self._core.stream(state, 0, self.tokenizer()):
                yield item
        else:  # finished and evicted from memory: the rest comes from Redis
            for item in stored_stream(state.record, state.tokens, 0, self.tokenizer()):
                yield item

    def is_finished(self, request_id: str) -> bool:
        """True when the request has ended (its stream's next item after the tokens is the final)."""
        state = self._core.requests.get(request_id)
        return state is None or state.finished

    async def cancel(self, request_id: str) -> bool:
        return await self._core.cancel(request_id)

    def cancel_soon(self, request_id: str) -> None:
        """Cancel from a task of its own: the caller may itself be a cancelled stream."""
        task = asyncio.get_running_loop().create_task(self._cancel_logged(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_logged(self, request_id: str) -> None:
        try:
            await self._core.cancel(request_id)
        except Exception:  # the client is gone: nobody else would see this failure
            log.exception("cancelling request %s after its client left failed", request_id)
