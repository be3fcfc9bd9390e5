"""Tokenizers the scheduler and the workers share (torch-free).

Two kinds travel over the wire (``WorkerService.GetTokenizer``): ``"bytes"``, the byte-level
tokenizer of the built-in presets (ids 0..255 are raw bytes, then the special tokens), and
``"hf"``, a HuggingFace ``tokenizer.json`` run by the ``tokenizers`` library. The scheduler fetches
the worker's tokenizer this way, so no shared filesystem is needed.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

from common.errors import InvalidArgument, NotFound


class Tokenizer(ABC):
    """Text ↔ token ids."""

    kind: str
    bos_token_id: int | None
    eos_token_id: int | None

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

    def __init__(self, tokenizer_json: str, bos_token_id: int | None, eos_token_id: int | None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._json = tokenizer_json
        self._tok = _Tokenizer.from_str(tokenizer_json)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        # The tokenizer.json post-processor adds BOS for models that want it (Llama does, Qwen2 doesn't).
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def to_wire(self) -> tuple[str, bytes]:
        payload = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "json": self._json}
        return self.kind, json.dumps(payload).encode()


def tokenizer_from_wire(kind: str, payload: bytes) -> Tokenizer:
    """Rebuild a tokenizer sent by ``Tokenizer.to_wire``."""
    try:
        data = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"tokenizer payload of kind {kind!r} is not valid JSON: {exc}") from exc
    if kind == ByteTokenizer.kind:
        return ByteTokenizer(data["bos_token_id"], data["eos_token_id"])
    if kind == HFTokenizer.kind:
        return HFTokenizer(data["json"], data.get("bos_token_id"), data.get("eos_token_id"))
    raise InvalidArgument(f"unknown tokenizer kind {kind!r} (expected 'bytes' or 'hf')")


def load_tokenizer(folder: str | Path, bos_token_id: int | None, eos_token_id: int | None) -> Tokenizer:
    """The ``tokenizer.json`` of a HuggingFace model folder.

    BOS/EOS ids come from the model's config (the caller passes them), since tokenizer.json alone
    does not say which special token ends a sequence.
    """
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise NotFound(f"no tokenizer.json in model folder {str(folder)!r}")
    return HFTokenizer(path.read_text(encoding="utf-8"), bos_token_id, eos_token_id)


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
