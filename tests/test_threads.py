"""Worker torch threads: ``--threads`` when given, else the cores the process may use shared out among
the workers started together; the worker applies it process-wide before building its engine."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from pydantic import ValidationError

from common import threads
from common.config import WorkerSettings
from common.threads import threads_for, usable_cores
from worker_svc.engine_factory import engine_from_settings


def test_explicit_threads_win_and_the_default_follows_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    assert usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert threads_for(3) == 3
    assert threads_for(0) == 6
    assert threads_for(0, sharing=2) == 3
    assert threads_for(0, sharing=4) == 1  # never below one, never more than the share
    assert threads_for(0, sharing=16) == 1
    assert threads_for(0, sharing=1, reserved=1) == 5  # a core left to the scheduler and Redis
    assert threads_for(0, sharing=2, reserved=1) == 2
    assert threads_for(0, sharing=1, reserved=6) == 1  # never all of them


def test_threads_setting_is_validated() -> None:
    with pytest.raises(ValidationError, match="threads"):
        WorkerSettings(threads=-1)
    assert WorkerSettings().threads == 0


def test_worker_engine_runs_with_its_threads_in_every_thread() -> None:
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1  # a change the assertion can see
    try:
        engine_from_settings(WorkerSettings(model="tiny-llama", device="cpu", threads=want, gpu_blocks=16,
                                            host_blocks=16))
        assert torch.get_num_threads() == want
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # as the engine thread
        t.start()
        t.join()
        assert seen == [want]
    finally:
        torch.set_num_threads(before)
