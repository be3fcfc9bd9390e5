"""Watch ``--policy-file`` (a Helm ConfigMap mount) and swap the policy when its content changes.

The file holds ``{name, params}`` as JSON or YAML. It is polled (ConfigMap updates replace a
symlink, which inotify-style watchers miss); a file that does not parse or names a bad policy is
logged and ignored, and the running policy stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from common.errors import InvalidArgument, LayerKVError

log = logging.getLogger(__name__)


class PolicySetter(Protocol):
    async def set_policy(self, name: str, params: dict[str, Any]) -> Any: ...


def parse_policy_file(text: str, source: str) -> tuple[str, dict[str, Any]]:
    """``(name, params)`` from JSON, or YAML when PyYAML is installed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError as exc:
            raise InvalidArgument(f"{source} is not JSON (and PyYAML is not installed for YAML)") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"{source} is neither JSON nor YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise InvalidArgument(f"{source} must hold a mapping with a 'name' string and optional 'params'")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"'params' in {source} must be a mapping, got {params!r}")
    return data["name"], params


class PolicyFileWatcher:
    def __init__(self, core: PolicySetter, path: str, interval_s: float) -> None:
        self._core = core
        self._path = Path(path) if path else None
        self._interval_s = interval_s
        self._last: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._path is not None:
            self._task = asyncio.create_task(self._run(), name="policy-file")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_once(self) -> bool:
        """Apply the file if it changed since the last check; True when a policy was set."""
        assert self._path is not None, "no --policy-file configured"
        try:
            text = self._path.read_text()
        except OSError as exc:
            log.warning("policy file %s unreadable: %s", self._path, exc)
            return False
        if text == self._last:
            return False
        self._last = text
        try:
            name, params = parse_policy_file(text, str(self._path))
            await self._core.set_policy(name, params)
        except LayerKVError as exc:
            log.error("policy file %s ignored: %s", self._path, exc)
            return False
        log.info("policy file %s applied: %s", self._path, name)
        return True

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval_s)
