"""Typed request and response bodies of the OpenAI-compatible API (pydantic).

Requests ignore fields they do not know, as OpenAI-compatible servers do (clients and benchmark
tools send extras such as ``user`` or ``repetition_penalty``); fields we know but cannot honour
(``n > 1``, log-probabilities, penalties, tools) are refused with a 400 naming the field instead
of being silently dropped. Responses follow OpenAI's shapes field for field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

UINT64_LIMIT = 2**64
UINT32_LIMIT = 2**32  # the wire carries token ids, counts and top_k as uint32
TokenId = Annotated[int, Field(ge=0, lt=UINT32_LIMIT, strict=True)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = Field(False, description="send a last chunk with token usage before [DONE]")


class _GenerationRequest(_Lenient):
    """Fields both endpoints share (OpenAI's plus vLLM's common extensions)."""

    model: str = Field("", description="a served model id (GET /v1/models); empty: the only one")
    stream: bool = Field(False, description="server-sent events, one chunk per text delta")
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus mass; default 1")
    top_k: int | None = Field(None, ge=-1, lt=UINT32_LIMIT, description="vLLM extension; -1 or 0: no cut")
    seed: int | None = Field(None, ge=0, lt=UINT64_LIMIT, description="reproducible sampling")
    stop: str | list[str] | None = Field(None, description="strings that end the output (not included)")
    stop_token_ids: list[TokenId] | None = Field(None, description="vLLM extension: token ids that end it")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS")
    expected_output_tokens: int | None = Field(
        None,
        ge=1,
        lt=UINT32_LIMIT,
        description="LayerKV extension: the client's estimate of its output length (at most the "
        "max tokens), which the SLO-aware policy uses instead of its own prediction",
    )
    n: int = Field(1, ge=1, description="choices per request; only 1 is supported")
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    repetition_penalty: float | None = Field(None, description="vLLM extension; only 1 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported (must be empty)")


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        description="text or token ids; a list holds one prompt (batches are not supported)"
    )
    max_tokens: int | None = Field(16, ge=1, lt=UINT32_LIMIT, description="at most (OpenAI default 16)")
    echo: bool = Field(False, description="not supported")
    logprobs: int | None = Field(None, description="not supported (must be null)")
    best_of: int | None = Field(None, description="only 1 is supported")
    suffix: str | None = Field(None, description="not supported")


class ContentPart(_Lenient):
    """One part of a message's content; only ``text`` parts are understood."""

    type: str
    text: str | None = None


class ChatMessageIn(_Lenient):
    role: str = Field(min_length=1)
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, lt=UINT32_LIMIT, description="max_completion_tokens, old name")
    max_completion_tokens: int | None = Field(None, ge=1, lt=UINT32_LIMIT, description="tokens at most")
    logprobs: bool | None = Field(None, description="not supported (must be false or null)")
    top_logprobs: int | None = Field(None, description="not supported")
    tools: list[Any] | None = Field(None, description="not supported (must be empty)")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")
    add_generation_prompt: bool = Field(True, description="vLLM extension: open the assistant turn")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (``stream``) one chunk of it: OpenAI uses one shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: the role once, then content.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "layerkv"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
