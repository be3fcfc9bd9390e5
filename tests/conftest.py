"""Shared fixtures: the uvloop event loop for async tests, a real redis-server on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from layerkv.testing.ports import free_port
from layerkv.testing.redis_server import RedisServer

__all__ = ["free_port"]  # tests import it from here


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Run every async test on uvloop, as the services do in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, real redis-server on a free port for one test; stopped afterwards."""
    server = RedisServer(tmp_path).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def hf_and_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny random 4-layer GQA Llama from transformers, and the folder it was saved to."""
    from tests.test_engine_reference import build_hf_model

    model = build_hf_model("llama", layers=4, heads=4, kv_heads=2)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return model, path
