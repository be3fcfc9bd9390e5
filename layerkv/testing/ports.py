"""Free TCP ports on a host (bound and released: the caller starts its server right after)."""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_or_free(port: int, host: str = "127.0.0.1") -> int:
    """``port`` when it can be bound on ``host``, else (or for 0) a free one."""
    if port:
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                pass
    return free_port(host)


def wait_tcp(host: str, port: int, timeout_s: float, alive: object = None) -> bool:
    """Until something accepts on ``host:port`` (True) or ``timeout_s`` passes (False); ``alive``,
    when given, is called between tries and may raise to give up early."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(alive):
            alive()
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False
