"""Incremental detokenizers: the text of a growing token stream, O(new tokens) work per chunk.

Concatenating every delta and the final ``flush`` gives exactly ``decode`` of the whole output.
``Utf8Detokenizer`` serves byte-level ids (Python's incremental UTF-8 decoder holds an incomplete
multi-byte character back). ``WindowDetokenizer`` serves any ``decode``: each chunk is decoded
with a short window of tokens before it (vLLM's and TGI's method), so a decoder that treats a
sequence's first token specially (a stripped leading space) or merges bytes across tokens sees
the same neighbours as in the whole decode; text ending in an incomplete character is held
back. ``tokenizers.decoders.DecodeStream`` does the same window in Rust but can neither hand out
the held-back tail when the output ends nor survive byte-fallback groups (it raises "Invalid
prefix"), hence this one. Torch-free.
"""

from __future__ import annotations

import codecs
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence

_REPLACEMENT = "\ufffd"  # what an incomplete or invalid UTF-8 sequence decodes to


class Detokenizer(ABC):
    """Token ids in, text deltas out; ``flush`` when the output ends."""

    @abstractmethod
    def push(self, ids: Sequence[int]) -> str:
        """Append tokens; return the text that is final now (possibly empty)."""

    @abstractmethod
    def flush(self) -> str:
        """The text still held back (an incomplete or invalid tail); call when the output ends."""


class Utf8Detokenizer(Detokenizer):
    """Ids 0..255 are bytes of UTF-8 text; other ids (special tokens) decode to nothing."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        return str(self._decoder.decode(bytes(i for i in ids if 0 <= i < 256)))

    def flush(self) -> str:
        return str(self._decoder.decode(b"", final=True))


class WindowDetokenizer(Detokenizer):
    """Decodes each chunk with the previous chunk as context.

    ``prefix_offset .. read_offset`` are the tokens whose text was emitted last (the context),
    ``read_offset ..`` the ones not emitted yet. A chunk's text is decode(context + new) less
    decode(context). ``hold_ids`` are tokens whose text a later token can still change (the
    byte-fallback ``<0xNN>`` tokens, decoded as one group): text is emitted only up to the last
    token outside them.
    """

    def __init__(self, decode: Callable[[list[int]], str], hold_ids: Collection[int] = ()) -> None:
        self._decode = decode
        self._hold = hold_ids
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        end = len(self._ids)
        while end > self._read_offset and self._ids[end - 1] in self._hold:
            end -= 1
        if end == self._read_offset:
            return ""
        return self._advance(end, final=False)

    def flush(self) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        return self._advance(len(self._ids), final=True)

    def _advance(self, end: int, final: bool) -> str:
        context = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:end])
        if not final and (text.endswith(_REPLACEMENT) or len(text) <= len(context)):
            return ""  # an incomplete character (or nothing new yet): wait for the next tokens
        if not text.startswith(context):  # the decoder rewrote the context: emit what follows it
            common = 0
            while common < min(len(text), len(context)) and text[common] == context[common]:
                common += 1
            context = text[:common]
        self._prefix_offset, self._read_offset = self._read_offset, end
        return text[len(context):]
