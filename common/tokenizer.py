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
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from common.detokenizer import Detokenizer, Utf8Detokenizer, WindowDetokenizer
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

    def detokenizer(self) -> Detokenizer:
        """A fresh incremental detokenizer of one output stream (``push`` ids, ``flush`` at the end)."""
        return WindowDetokenizer(self.decode)


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

    def detokenizer(self) -> Detokenizer:
        return Utf8Detokenizer()

    def to_wire(self) -> tuple[str, bytes]:
        payload = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}
        return self.kind, json.dumps(payload).encode()


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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

    def detokenizer(self) -> Detokenizer:
        return WindowDetokenizer(self.decode, self._held_ids)

    @cached_property
    def _held_ids(self) -> frozenset[int]:
        """When the decoder joins ``<0xNN>`` tokens into one byte group (``ByteFallback``), a later
        byte token can turn the group's text into replacement characters: those tokens, and the
        special ones (skipped by decode, so a group runs on across them), are held back."""
        if '"ByteFallback"' not in json.dumps(json.loads(self._json).get("decoder")):
            return frozenset()
        specials = {i for i, added in self._tok.get_added_tokens_decoder().items() if added.special}
        byte_tokens = {i for token, i in self._tok.get_vocab().items() if _BYTE_TOKEN.fullmatch(token)}
        return frozenset(specials | byte_tokens)

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
    """Turns a growing list of token ids into text deltas, O(new tokens) work per push.

    Every delta is final (a UTF-8 character split across tokens waits for its last byte), and the
    deltas followed by ``flush`` add up to ``decode`` of all the ids. The tokenizer picks the
    method (``Tokenizer.detokenizer``, common/detokenizer.py).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._detokenizer = tokenizer.detokenizer()
        self._pieces: list[str] = []  # the deltas returned so far (joined only when asked)

    def push(self, new_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        delta = self._detokenizer.push(new_ids)
        if delta:
            self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """The text still held back (an incomplete or invalid UTF-8 tail); call when the output ends."""
        delta = self._detokenizer.flush()
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return "".join(self._pieces)
