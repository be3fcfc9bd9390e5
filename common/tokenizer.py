"""Tokenizers the scheduler and the workers share (torch-free).

Two kinds travel over the wire (``WorkerService.GetTokenizer``): ``"bytes"``, the byte-level
tokenizer of the built-in presets (ids 0..255 are raw bytes, then the special tokens), and
``"hf"``, a HuggingFace ``tokenizer.json`` run by the ``tokenizers`` library. The scheduler fetches
the worker's tokenizer this way, so no shared filesystem is needed. A tokenizer also carries the
model's Jinja chat template and the text of its BOS/EOS tokens (``chat_template``, ``bos_token``,
``eos_token``; empty when the model has none), which travel in GetTokenizer's fields of those names.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument, NotFound


class Tokenizer(ABC):
    """Text ↔ token ids."""

    kind: str
    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str = ""  # Jinja template (HuggingFace convention); empty: the model has none
    bos_token: str = ""  # what the template's ``bos_token`` renders as
    eos_token: str = ""  # what the template's ``eos_token`` renders as

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the BOS token prepended when the tokenizer has one."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""

    @abstractmethod
    def to_wire(self) -> tuple[str, bytes]:
        """(kind, payload) for ``tokenizer_from_wire`` on the other side."""


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer: id ``b`` for byte ``b``, then BOS and EOS; other ids decode to nothing."""

    kind = "bytes"

    def __init__(self, bos_token_id: int = 256, eos_token_id: int = 257) -> None:
        if min(bos_token_id, eos_token_id) < 256:
            raise ValueError("special token ids must not collide with the 256 byte ids")
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def to_wire(self) -> tuple[str, bytes]:
        payload = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}
        return self.kind, json.dumps(payload).encode()


class HFTokenizer(Tokenizer):
    """A HuggingFace ``tokenizer.json`` run by the ``tokenizers`` library."""

    kind = "hf"

    def __init__(self, tokenizer_json: str, bos_token_id: int | None, eos_token_id: int | None,
                 chat_template: str = "", bos_token: str = "", eos_token: str = "") -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._json = tokenizer_json
        self._tok = _Tokenizer.from_str(tokenizer_json)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template, self.bos_token, self.eos_token = chat_template, bos_token, eos_token

    def encode(self, text: str) -> list[int]:
        # The tokenizer.json post-processor adds BOS for models that want it (Llama does, Qwen2 doesn't).
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def to_wire(self) -> tuple[str, bytes]:
        payload = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "json": self._json}
        return self.kind, json.dumps(payload).encode()


def tokenizer_from_wire(kind: str, payload: bytes, chat_template: str = "", bos_token: str = "",
                        eos_token: str = "") -> Tokenizer:
    """Rebuild a tokenizer sent by ``Tokenizer.to_wire`` (plus GetTokenizer's template fields)."""
    try:
        data = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"tokenizer payload of kind {kind!r} is not valid JSON: {exc}") from exc
    if kind == ByteTokenizer.kind:
        return ByteTokenizer(data["bos_token_id"], data["eos_token_id"])
    if kind == HFTokenizer.kind:
        return HFTokenizer(data["json"], data.get("bos_token_id"), data.get("eos_token_id"),
                           chat_template, bos_token, eos_token)
    raise InvalidArgument(f"unknown tokenizer kind {kind!r} (expected 'bytes' or 'hf')")


def load_tokenizer(folder: str | Path, bos_token_id: int | None, eos_token_id: int | None) -> Tokenizer:
    """The ``tokenizer.json`` of a HuggingFace model folder.

    BOS/EOS ids come from the model's config (the caller passes them), since tokenizer.json alone
    does not say which special token ends a sequence.
    """
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise NotFound(f"no tokenizer.json in model folder {str(folder)!r}")
    template, bos, eos = _folder_chat_template(Path(folder))
    return HFTokenizer(path.read_text(encoding="utf-8"), bos_token_id, eos_token_id, template, bos, eos)


def _folder_chat_template(folder: Path) -> tuple[str, str, str]:
    """(chat_template, bos_token, eos_token) of a HF folder: ``chat_template.jinja`` or the template in
    ``tokenizer_config.json``; empty strings when the folder has none."""
    config: dict[str, Any] = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{config_path} is not valid JSON: {exc}") from exc
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template") or ""
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template", "") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), "")

    def token_text(value: Any) -> str:  # a string, or an AddedToken dict {"content": ...}
        return str(value.get("content", "")) if isinstance(value, dict) else str(value or "")

    return str(template), token_text(config.get("bos_token")), token_text(config.get("eos_token"))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8 character.

    Decoding token by token breaks multi-byte characters and tokenizers that merge spaces, so it
    re-decodes a short window and emits only text that is final (no trailing replacement char).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""  # text already returned

    def push(self, new_ids: list[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        self._ids.extend(new_ids)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more tokens
            return ""
        if not text.startswith(self._emitted):  # the tokenizer rewrote the past: emit nothing now
            return ""
        delta = text[len(self._emitted):]
        self._emitted = text
        return delta

    def flush(self) -> str:
        """The text still held back (an incomplete or invalid UTF-8 tail); call when the output ends."""
        text = self._tokenizer.decode(self._ids)
        delta = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return delta

    @property
    def text(self) -> str:
        return self._emitted
