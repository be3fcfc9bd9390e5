"""Renders chat messages into a prompt with a model's Jinja chat template (HuggingFace convention).

The template, ``bos_token`` and ``eos_token`` come from the model (a tokenizer carries them as
``chat_template``, ``bos_token`` and ``eos_token``). Templates run in Jinja's immutable sandbox with
the options and helpers transformers gives them (``trim_blocks``, ``lstrip_blocks``, ``tojson``,
``raise_exception``), so a template written for transformers renders the same here. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from common.errors import InvalidArgument


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str  # system | user | assistant (templates may accept others)
    content: str


def _raise(message: str) -> None:
    raise InvalidArgument(f"the chat template refused the messages: {message}")


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise InvalidArgument(f"the model's chat template does not compile: {exc}") from exc


def apply_chat_template(template: str, messages: Sequence[ChatMessage], *, bos_token: str = "",
                        eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages``; ends with the assistant's turn opening when asked."""
    if not template:
        raise InvalidArgument("the model has no chat template: send a plain prompt instead")
    if not messages:
        raise InvalidArgument("a chat needs at least one message")
    from jinja2 import TemplateError

    try:
        return str(_compile(template).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt))
    except TemplateError as exc:
        raise InvalidArgument(f"the model's chat template failed to render: {exc}") from exc


def apply_to_tokenizer(tokenizer: Any, messages: Sequence[ChatMessage]) -> str:
    """``apply_chat_template`` with the template and special tokens a tokenizer carries."""
    return apply_chat_template(tokenizer.chat_template, messages, bos_token=tokenizer.bos_token,
                               eos_token=tokenizer.eos_token)
