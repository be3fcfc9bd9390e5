"""The incremental detokenizer before issue 9, kept verbatim as a reference: it re-decoded the
whole output on every chunk (O(output) per chunk). ``benchmarks/sampling_detok.py`` times it
against ``common.tokenizer.IncrementalDetokenizer``.
"""

from __future__ import annotations

from common.tokenizer import Tokenizer


class FullRedecodeDetokenizer:
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
