"""HuggingFace-style chat templates (Jinja) rendered to prompt text, torch-free.

A model's chat template (``tokenizer_config.json``'s ``chat_template`` or the GGUF metadata's
``tokenizer.chat_template``) is a Jinja program over ``messages``, ``add_generation_prompt``,
``bos_token`` and ``eos_token``; it runs here in a sandboxed environment with the same options
and helpers transformers gives it (``raise_exception``, ``tojson``, ``strftime_now``), so the text
is what ``apply_chat_template(..., tokenize=False)`` would produce.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from common.errors import InvalidArgument


class ChatTemplateError(InvalidArgument):
    """The template refused the conversation (``raise_exception``) or could not be rendered."""


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation: a role (system, user, assistant, tool) and its text."""

    role: str
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    """A model's template and the special-token strings it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value: Any, indent: int | None = None) -> str:
    # transformers' tojson keeps non-ASCII characters as they are (Jinja's own escapes HTML).
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The options transformers compiles templates with: templates are written for them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc


def render_chat(
    template: ChatTemplate, messages: Sequence[ChatMessage], add_generation_prompt: bool = True
) -> str:
    """The prompt text of ``messages`` under ``template`` (a bad template → ``ChatTemplateError``)."""
    from jinja2 import TemplateError

    if not messages:
        raise InvalidArgument("messages is empty: a chat request needs at least one message")
    compiled = _compile(template.source)
    try:
        return str(
            compiled.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=template.bos_token,
                eos_token=template.eos_token,
            )
        )
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError) as exc:
        raise ChatTemplateError(f"the model's chat template failed on this conversation: {exc}") from exc


def template_of(tokenizer: object) -> ChatTemplate | None:
    """The chat template a tokenizer carries (attributes ``chat_template``, ``bos_token``,
    ``eos_token``, set from the model's metadata), or None when the model has none."""
    source = getattr(tokenizer, "chat_template", None) or ""
    if not source:
        return None
    bos = getattr(tokenizer, "bos_token", "") or ""
    eos = getattr(tokenizer, "eos_token", "") or ""
    return ChatTemplate(str(source), str(bos), str(eos))
