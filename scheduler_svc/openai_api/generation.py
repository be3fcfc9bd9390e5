"""One generation as the HTTP API sees it: submit through the gateway, follow the token stream,
apply stop strings, and end with a typed outcome (finish reason and token usage).

Both endpoints and both modes (whole response or server-sent events) consume ``generate``. A
consumer that stops early (the client disconnected, or a stop string matched) cancels the request
on the scheduler, which aborts it on its worker and frees its blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.types import FinishReason, SamplingParams
from scheduler_svc.openai_api.gateway import RequestGateway, Submitted
from scheduler_svc.openai_api.stops import StopMatcher
from scheduler_svc.requests import StreamChunk

# Our finish reasons in OpenAI's words; "abort" (vLLM's word) when the scheduler cancelled it.
OPENAI_FINISH = {
    FinishReason.STOP.value: "stop",
    FinishReason.LENGTH.value: "length",
    FinishReason.ABORT.value: "abort",
}


@dataclass(frozen=True)
class Job:
    """What to generate: a prompt (text or token ids), sampling values and stop strings."""

    prompt: str | list[int]
    sampling: SamplingParams
    stops: tuple[str, ...] = ()
    expected_output_tokens: int = 0  # the client's estimate of its output length (0: not given)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Outcome:
    """The end of a generation: the last text (sent together with the finish reason, as vLLM
    does), reason and usage. ``error`` is set when a worker failed the request."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str = ""
    text: str = ""


async def start(gateway: RequestGateway, job: Job) -> AsyncIterator[TextDelta | Outcome]:
    """Admit the job now (a refusal raises here, before any response is sent), then follow it."""
    submitted = await gateway.submit(job.prompt, job.sampling, job.expected_output_tokens)
    return follow(gateway, submitted, job.stops)


async def follow(
    gateway: RequestGateway, submitted: Submitted, stops: tuple[str, ...]
) -> AsyncIterator[TextDelta | Outcome]:
    """Text deltas as they are generated, then exactly one ``Outcome``."""
    request_id = submitted.request_id
    matcher = StopMatcher(stops)
    completion = 0
    held = ""  # the last text, when the request has already ended: it rides on the Outcome
    done = False
    try:
        async for item in gateway.stream(request_id):
            if isinstance(item, StreamChunk):
                completion += len(item.token_ids)
                text = matcher.push(item.text_delta)
                if matcher.stopped:
                    done = True
                    gateway.cancel_soon(request_id)  # free the blocks now, not at max_tokens
                    yield Outcome("stop", submitted.prompt_tokens, completion, text=held + text)
                    return
                if gateway.is_finished(request_id):
                    held += text  # the final item follows at once
                elif text:
                    yield TextDelta(text)
                continue
            done = True
            record = item.record
            reason = OPENAI_FINISH.get(record.finish_reason, "error")
            error = record.error if reason == "error" else ""
            yield Outcome(reason, submitted.prompt_tokens, completion, error, held + matcher.flush())
            return
    finally:
        if not done:  # the consumer left early: the client went away mid-stream
            gateway.cancel_soon(request_id)
