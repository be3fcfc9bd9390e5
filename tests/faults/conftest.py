"""One fault fleet for the whole suite (process start-up is the slow part); each test leaves it
healed, which is itself what the suite checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import FaultFleet, start_fault_fleet


@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultFleet]:
    started = start_fault_fleet(tmp_path_factory.mktemp("faults"))
    try:
        yield started
    finally:
        started.stop()
