"""Where ``layerkv up`` leaves the tokens it generated, so that the local clients find them.

One JSON file per scheduler endpoint, readable by the user alone, in
``$LAYERKV_CREDENTIALS_DIR`` or else ``$XDG_RUNTIME_DIR/layerkv`` or ``~/.local/state/layerkv``.
``layerkv generate --endpoint``, ``layerkv policy`` and ``layerkv workers`` use it when no token
is given by flag or environment variable; ``layerkv up`` removes it when it stops.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

_LOCAL = ("127.0.0.1", "localhost", "[::1]", "::1", "0.0.0.0", "[::]")  # all reach this host


@dataclass(frozen=True)
class Credentials:
    """The tokens of one scheduler endpoint."""

    api_token: str = ""  # SchedulerService (the client API)
    admin_token: str = ""  # AdminService


def credentials_dir() -> Path:
    explicit = os.environ.get("LAYERKV_CREDENTIALS_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "layerkv"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "layerkv"


def credentials_path(endpoint: str) -> Path:
    """The file of ``endpoint`` (loopback names share one: ``localhost:N`` is ``127.0.0.1:N``)."""
    host, _, port = endpoint.rpartition(":")
    if host in _LOCAL:
        host = "127.0.0.1"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{host}_{port}")
    return credentials_dir() / f"endpoint-{name}.json"


def save(endpoint: str, creds: Credentials) -> Path:
    """Write the file with mode 0600 (its folder 0700); returns its path."""
    path = credentials_path(endpoint)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"endpoint": endpoint, **asdict(creds)}, f)
    return path


def load(endpoint: str) -> Credentials:
    """The saved tokens of ``endpoint``; empty ones when there is no (readable) file."""
    try:
        data = json.loads(credentials_path(endpoint).read_text())
    except (OSError, ValueError):
        return Credentials()
    return Credentials(str(data.get("api_token", "")), str(data.get("admin_token", "")))


def forget(endpoint: str) -> None:
    credentials_path(endpoint).unlink(missing_ok=True)
