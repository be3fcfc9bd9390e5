"""The faults a test can inflict on one child process: kill, pause, resume, restart.

``ChildProcess`` holds the ``Popen`` of a service the tests started (a redis-server, a scheduler,
a worker) and sends it the signals the fault tests need; each service says how it starts.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any


class ChildProcess:
    """A child process that can be SIGKILLed, SIGSTOPped, SIGCONTed and restarted."""

    proc: subprocess.Popen[bytes] | None

    def start(self) -> Any:
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL (nothing is flushed) and reap; a paused process is resumed first so it dies now."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: a hung process (its sockets stay open, nothing answers)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> Any:
        """SIGKILL, then the same command line again (same port, same log or data folder)."""
        self.kill()
        return self.start()
