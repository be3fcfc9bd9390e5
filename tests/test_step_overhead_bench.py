"""The step-overhead benchmark at a toy size: both KV-copy modes submit the same copy runs, and
only ``memcpy`` moves (and times) data."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from benchmarks.step_overhead import half_host, measure


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()  # process-wide: later tests get back what they had
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_count_mode_submits_the_same_runs_without_moving_kv() -> None:
    letters = half_host(4)
    moved = measure(4, 3, 40, 2, 4, letters, move=True)
    counted = measure(4, 3, 40, 2, 4, letters, move=False)
    assert moved.runs == counted.runs > 0
    # one copy call per host layer and direction (2 host layers of 4), however many runs
    assert moved.calls == counted.calls == 4 < counted.runs
    assert counted.copy_s == 0.0
    all_gpu = measure(4, 3, 40, 2, 4, "G" * 4, move=True)
    assert all_gpu.runs == all_gpu.calls == 0
