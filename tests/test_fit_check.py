"""Admission's never-fits check, remembered per request size: the same answers as computing it,
forgotten when the policy or a worker's description changes."""

from __future__ import annotations

from dataclasses import replace

from common.types import CostModel, TierCapacity
from scheduler_svc.fit_check import FitCheck, never_fits_anywhere
from scheduler_svc.policies.registry import make_policy
from scheduler_svc.testing.stub_worker import STUB_GEOMETRY
from scheduler_svc.worker_events import WorkerDescription


def describe(gpu_blocks: int) -> WorkerDescription:
    return WorkerDescription("w0", "stub", STUB_GEOMETRY, TierCapacity(gpu_blocks, 0), CostModel(), 4096, 0)


def test_answers_match_and_follow_policy_and_worker_changes() -> None:
    check = FitCheck()
    fcfs, small = make_policy("fcfs-full", {}), [describe(8)]
    for total in (4, 8, 9, 100, 8):  # 4 layers of 4-token blocks: 8 tokens fit 8 blocks, 9 do not
        assert check(fcfs, small, total) == never_fits_anywhere(fcfs, small, total)
    assert check(fcfs, small, 8) is None and check(fcfs, small, 9) is not None
    bigger = [replace(small[0], capacity=TierCapacity(64, 0))]  # the worker came back larger
    assert check(fcfs, bigger, 9) is None
    other = make_policy("vllm", {})
    assert check(other, bigger, 9) == never_fits_anywhere(other, bigger, 9)
