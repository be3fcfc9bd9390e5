"""OpenAI request bodies → a ``Job`` (prompt, sampling values, stop strings).

Field values the scheduler cannot honour are refused here with a 400 that names the field; chat
messages are rendered with the model's own chat template (``common.chat_template``), read from the
tokenizer the workers sent, and tokenized without a second BOS when the template writes one.
"""

from __future__ import annotations

from common.chat_template import ChatMessage, render_chat, template_of
from common.errors import InvalidArgument, Unavailable
from common.types import SamplingParams
from scheduler_svc.openai_api.errors import ApiError, ErrorKind, invalid
from scheduler_svc.openai_api.gateway import RequestGateway
from scheduler_svc.openai_api.generation import Job
from scheduler_svc.openai_api.models import ChatCompletionRequest, CompletionRequest, _GenerationRequest

MODEL_NOT_FOUND = ErrorKind(404, "invalid_request_error", "model_not_found")


def check_model(gateway: RequestGateway, name: str) -> str:
    """The model id to answer with; an unknown name is a 404 ``model_not_found``."""
    models = gateway.models()
    if not models:
        raise Unavailable("no healthy worker is connected; retry later")
    if not name:
        return models[0].id
    if not gateway.accepts_model(name):
        known = ", ".join(m.id for m in models)
        raise ApiError(MODEL_NOT_FOUND, f"the model {name!r} does not exist (served: {known})", "model")
    return name


def _check_common(req: _GenerationRequest) -> None:
    if req.n != 1:
        raise invalid(f"n={req.n} is not supported: one choice per request", "n")
    for name, value, neutral in (
        ("presence_penalty", req.presence_penalty, 0.0),
        ("frequency_penalty", req.frequency_penalty, 0.0),
        ("repetition_penalty", req.repetition_penalty, 1.0),
    ):
        if value is not None and value != neutral:
            raise invalid(f"{name}={value} is not supported (only {neutral})", name)
    if req.logit_bias:
        raise invalid("logit_bias is not supported", "logit_bias")


def stops_of(req: _GenerationRequest) -> tuple[str, ...]:
    stop = req.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in stops):
        raise invalid("stop strings must not be empty", "stop")
    return stops


def expected_output_of(req: _GenerationRequest, sampling: SamplingParams) -> int:
    """The client's output-length estimate (0: none), at most its max tokens."""
    expected = req.expected_output_tokens or 0
    if expected > sampling.max_tokens:
        raise invalid(
            f"expected_output_tokens={expected} is more than the max tokens ({sampling.max_tokens})",
            "expected_output_tokens",
        )
    return expected


def sampling_of(req: _GenerationRequest, max_tokens: int | None, default_max_tokens: int) -> SamplingParams:
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    try:
        return SamplingParams(
            max_tokens=max_tokens or default_max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
        )
    except InvalidArgument as exc:
        raise invalid(str(exc)) from exc


def completion_job(req: CompletionRequest, gateway: RequestGateway) -> Job:
    _check_common(req)
    if req.echo:
        raise invalid("echo is not supported", "echo")
    if req.logprobs is not None:
        raise invalid("logprobs are not supported", "logprobs")
    if req.best_of not in (None, 1):
        raise invalid(f"best_of={req.best_of} is not supported (only 1)", "best_of")
    if req.suffix:
        raise invalid("suffix is not supported", "suffix")
    prompt: str | list[int]
    if isinstance(req.prompt, str):
        prompt = req.prompt
    elif req.prompt and all(isinstance(p, int) for p in req.prompt):
        prompt = [int(p) for p in req.prompt]  # type: ignore[arg-type]
    elif len(req.prompt) == 1:
        one = req.prompt[0]
        prompt = one if isinstance(one, str) else [int(t) for t in one]  # type: ignore[union-attr]
    else:
        raise invalid(f"prompt holds {len(req.prompt)} prompts: send one per request", "prompt")
    sampling = sampling_of(req, req.max_tokens, gateway.default_max_tokens)
    return Job(prompt, sampling, stops_of(req), expected_output_of(req, sampling))


def _text_of(index: int, content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:  # type: ignore[attr-defined]
        if part.type != "text" or part.text is None:
            raise invalid(f"messages[{index}]: content parts of type {part.type!r} are not supported",
                          f"messages.{index}.content")  # fmt: skip
        parts.append(part.text)
    return "".join(parts)


def chat_job(req: ChatCompletionRequest, gateway: RequestGateway) -> Job:
    _check_common(req)
    if req.logprobs or req.top_logprobs:
        raise invalid("logprobs are not supported", "logprobs")
    if req.tools:
        raise invalid("tools are not supported", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise invalid("only response_format {'type': 'text'} is supported", "response_format")
    tokenizer = gateway.tokenizer()
    if tokenizer is None:
        raise Unavailable("no worker tokenizer is loaded yet; retry later")
    template = template_of(tokenizer)
    if template is None:
        raise invalid("model has no chat template: use /v1/completions with a prompt", "messages")
    messages = [ChatMessage(m.role, _text_of(i, m.content)) for i, m in enumerate(req.messages)]
    text = render_chat(template, messages, req.add_generation_prompt)
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    if template.bos_token and text.startswith(template.bos_token) and ids[:2] == [bos, bos]:
        ids = ids[1:]  # the template wrote BOS and the tokenizer added its own
    if not ids:
        raise invalid("the chat template rendered an empty prompt", "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens
    sampling = sampling_of(req, max_tokens, gateway.default_max_tokens)
    return Job(ids, sampling, stops_of(req), expected_output_of(req, sampling))
