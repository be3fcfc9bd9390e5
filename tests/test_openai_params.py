"""OpenAI request bodies → jobs: chat prompts get one BOS even when the template writes it, and
unsupported values are refused with the field named."""

from __future__ import annotations

import pytest

from common.tokenizer import ByteTokenizer
from scheduler_svc.openai_api.errors import ApiError
from scheduler_svc.openai_api.models import ChatCompletionRequest, CompletionRequest
from scheduler_svc.openai_api.params import chat_job, completion_job

BOS = 256


class SpecialAwareBytes(ByteTokenizer):
    """Bytes, but the text "<s>" is the BOS token (as a real tokenizer's special tokens are)."""

    chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    bos_token = "<s>"
    eos_token = "</s>"

    def encode(self, text: str) -> list[int]:
        out = [BOS]
        while text:
            if text.startswith("<s>"):
                out.append(BOS)
                text = text[3:]
            else:
                out.extend(text[0].encode())
                text = text[1:]
        return out


class Gateway:
    default_max_tokens = 77

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer

    def tokenizer(self) -> object:
        return self._tokenizer


def test_a_template_that_writes_bos_gets_a_single_bos() -> None:
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    job = chat_job(req, Gateway(SpecialAwareBytes()))  # type: ignore[arg-type]
    assert job.prompt == [BOS, *b"[user]hi"]
    assert job.sampling.max_tokens == 77 and job.sampling.temperature == 1.0


def test_max_completion_tokens_wins_and_top_k_minus_one_is_off() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = ChatCompletionRequest(
        messages=[{"role": "user", "content": parts}],
        max_tokens=5, max_completion_tokens=9, top_k=-1, seed=3, stop="x", temperature=0,
    )  # fmt: skip
    job = chat_job(req, Gateway(SpecialAwareBytes()))  # type: ignore[arg-type]
    assert job.prompt == [BOS, *b"[user]ab"]
    assert (job.sampling.max_tokens, job.sampling.top_k, job.sampling.seed) == (9, 0, 3)
    assert job.stops == ("x",)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "logprobs": 2}, "logprobs"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "x", "repetition_penalty": 1.2}, "repetition_penalty"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "stop": ["ok", ""]}, "stop"),
    ],
)
def test_unsupported_completion_fields_name_themselves(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        completion_job(CompletionRequest(**body), Gateway(ByteTokenizer()))  # type: ignore[arg-type]
    assert refused.value.kind.status == 400 and refused.value.param == param


def test_non_text_content_parts_are_refused() -> None:
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(ApiError, match="image_url"):
        chat_job(req, Gateway(SpecialAwareBytes()))  # type: ignore[arg-type]
