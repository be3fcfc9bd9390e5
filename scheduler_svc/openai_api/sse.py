"""Responses of the two generation endpoints: whole bodies, and server-sent event streams.

A stream is ``data: <chunk JSON>`` events, one per text delta (the chat role rides on the first,
the finish reason on the last, as vLLM sends them), then (``stream_options.include_usage``) a chunk
with no choices and the token usage, then ``data: [DONE]``. A worker failure mid-stream is an
``error`` event in OpenAI's error shape before ``[DONE]``, since the status line has gone out.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from common.errors import LayerKVError
from scheduler_svc.openai_api.errors import INTERNAL, ApiError, body_of
from scheduler_svc.openai_api.generation import Outcome, TextDelta
from scheduler_svc.openai_api.models import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
)

DONE = "data: [DONE]\n\n"
Events = AsyncIterator[TextDelta | Outcome]


@dataclass(frozen=True)
class Meta:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> Meta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


def usage_of(outcome: Outcome) -> Usage:
    return Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
    )


def _failed(outcome: Outcome) -> ApiError:
    return ApiError(INTERNAL, f"the worker failed the request: {outcome.error or 'unknown error'}")


async def collect(events: Events) -> tuple[str, Outcome]:
    """The whole text and the outcome of a non-streamed generation."""
    parts: list[str] = []
    async for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            if event.finish_reason == "error":
                raise _failed(event)
            return "".join(parts) + event.text, event
    raise AssertionError("a generation always ends with an Outcome")


def completion_body(meta: Meta, text: str, outcome: Outcome) -> CompletionResponse:
    choice = CompletionChoice(text=text, finish_reason=outcome.finish_reason)
    return CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=[choice],
                              usage=usage_of(outcome))  # fmt: skip


def chat_body(meta: Meta, text: str, outcome: Outcome) -> ChatCompletionResponse:
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=outcome.finish_reason)
    return ChatCompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=[choice],
                                  usage=usage_of(outcome))  # fmt: skip


def _data(chunk: CompletionResponse | ChatCompletionChunk) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _error_event(exc: BaseException) -> str:
    _, body = body_of(exc)
    return f"data: {body.model_dump_json()}\n\n"


async def completion_stream(meta: Meta, events: Events, include_usage: bool) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None, usage: Usage | None = None) -> str:
        choices = [] if usage is not None else [CompletionChoice(text=text, finish_reason=finish)]
        return _data(CompletionResponse(id=meta.id, created=meta.created, model=meta.model,
                                        choices=choices, usage=usage))  # fmt: skip

    try:
        async for event in events:
            if isinstance(event, TextDelta):
                yield chunk(event.text)
                continue
            if event.finish_reason == "error":
                if event.text:
                    yield chunk(event.text)
                yield _error_event(_failed(event))
                break
            yield chunk(event.text, event.finish_reason)
            if include_usage:
                yield chunk("", usage=usage_of(event))
    except LayerKVError as exc:  # e.g. Redis failed mid-stream
        yield _error_event(exc)
    yield DONE


async def chat_stream(meta: Meta, events: Events, include_usage: bool) -> AsyncIterator[str]:
    role_sent = False

    def chunk(delta: ChatDelta | None, finish: str | None = None, usage: Usage | None = None) -> str:
        choices = [] if delta is None else [ChatChunkChoice(delta=delta, finish_reason=finish)]
        return _data(ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model,
                                         choices=choices, usage=usage))  # fmt: skip

    try:
        async for event in events:
            role: Literal["assistant"] | None = None if role_sent else "assistant"
            if isinstance(event, TextDelta):
                role_sent = True
                yield chunk(ChatDelta(role=role, content=event.text))
                continue
            if event.finish_reason == "error":
                if event.text:
                    yield chunk(ChatDelta(role=role, content=event.text))
                yield _error_event(_failed(event))
                break
            yield chunk(ChatDelta(role=role, content=event.text or None), event.finish_reason)
            if include_usage:
                yield chunk(None, usage=usage_of(event))
    except LayerKVError as exc:
        yield _error_event(exc)
    yield DONE
