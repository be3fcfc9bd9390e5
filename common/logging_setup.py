"""Logging of the service processes: one format, level from the CLI, quiet third-party loggers.

``RateLimitedLog`` bounds what hostile or broken clients can make a service write: bad messages
and refused credentials are logged one line each, at most ``burst`` lines per window, and the
lines it dropped are counted in the next one that passes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once (idempotent: a second call only changes the level)."""
    root = logging.getLogger()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(numeric)
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


class RateLimitedLog:
    """At most ``burst`` lines per ``window_s`` seconds on ``logger``; the rest are counted.

    The count of dropped lines is appended to the next line that passes, so an operator sees that
    (and how much) was left out without the log growing with the traffic.
    """

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = 10,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or window_s <= 0:
            raise ValueError(f"RateLimitedLog needs burst >= 1 and window_s > 0, got {burst}, {window_s}")
        self._logger = logger
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()  # the engine thread and the event loop may both log
        self._window_start = -float("inf")
        self._in_window = 0
        self.suppressed = 0  # dropped since the last line that passed

    def log(self, level: int, msg: str, *args: object, exc_info: BaseException | None = None) -> bool:
        """Log one line unless the window's budget is spent; True when it was written."""
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self._window_s:
                self._window_start, self._in_window = now, 0
            if self._in_window >= self._burst:
                self.suppressed += 1
                return False
            self._in_window += 1
            dropped, self.suppressed = self.suppressed, 0
        if dropped:
            msg, args = msg + " (%d similar lines suppressed before this one)", (*args, dropped)
        self._logger.log(level, msg, *args, exc_info=exc_info)
        return True
