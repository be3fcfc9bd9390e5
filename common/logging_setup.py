"""Logging of the service processes: one format, level from the CLI, quiet third-party loggers."""

from __future__ import annotations

import logging

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
