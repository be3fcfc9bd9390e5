"""Stop strings over a stream of text deltas: cut the text before the first stop string.

The scheduler and the workers stop on token ids only; stop *strings* are matched here, on the
detokenized text. A delta's tail that could still be the start of a stop string is held back
until the next delta says whether it is one, so no client ever sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text deltas in order; ``stopped`` turns true at the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text that can be shown now (everything before a stop string once one appears)."""
        if self.stopped:
            return ""
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = max((self._partial(text, s) for s in self._stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back tail, at the end of the output (it turned out not to be a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """Length of the longest end of ``text`` that is a proper beginning of ``stop``."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0
