"""Test helpers for the services: in-process engines, and (re-exported from ``layerkv.testing``,
the one home of ports, the redis-server launcher and process fleets) real processes.

Process start-ups are the slow part (torch import), so the e2e modules share fleets per module.
Every helper talks to the services only through their real gRPC APIs and generated stubs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.proto.layerkv.v1 import types_pb2
from common.types import SamplingParams
from layerkv.testing.ports import free_port
from layerkv.testing.processes import (
    REPO_ROOT,
    TINY,
    Fleet,
    ServiceProcess,
    scheduler_process,
    start_fleet,
    wait_workers_healthy,
    worker_process,
)
from layerkv.testing.redis_server import RedisServer

__all__ = [
    "REPO_ROOT", "TINY", "Fleet", "RedisProcess", "ServiceProcess", "free_port", "make_engine",
    "proto_sampling", "reference_outputs", "scheduler_process", "start_fleet", "wait_workers_healthy",
    "worker_process",
]  # fmt: skip


# --- in-process engine ---------------------------------------------------------------------------


def make_engine(gpu_blocks: int = 512, host_blocks: int = 512, **overrides: Any) -> Any:
    """A tiny-llama engine on CPU (random weights, seed 0: the same weights as any worker's)."""
    from worker_svc.engine import Engine, EngineConfig

    config = EngineConfig(
        model=TINY, device="cpu", dtype="float32", gpu_blocks=gpu_blocks, host_blocks=host_blocks, **overrides
    )
    return Engine.from_config(config)


def reference_outputs(
    engine: Any, prompts: Sequence[Sequence[int]], sampling: SamplingParams
) -> list[list[int]]:
    """Greedy outputs of ``prompts`` run one at a time by an in-process engine."""
    results: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        rid = f"ref-{i}-{time.monotonic_ns()}"
        engine.add_request(rid, list(prompt), sampling)
        tokens: list[int] = []
        while engine.has_work():
            for out in engine.step().outputs:
                if out.request_id == rid:
                    tokens.extend(out.new_token_ids)
        results.append(tokens)
    return results


def proto_sampling(max_tokens: int, ignore_eos: bool = True, **kw: Any) -> types_pb2.SamplingParams:
    return types_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **kw)


class RedisProcess(RedisServer):
    """A real redis-server on a free port, started at once (fleets that outlive one test)."""

    def __init__(self, folder: Path, appendonly: bool = False) -> None:
        super().__init__(folder, appendonly=appendonly)
        self.start()
