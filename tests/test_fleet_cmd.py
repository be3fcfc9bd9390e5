"""``layerkv worker`` and ``layerkv up`` command lines: every flag and env var of the contract."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import worker_svc.server
from common.config import WorkerSettings
from layerkv.cli import app
from worker_svc.engine_factory import engine_config_from_settings


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[WorkerSettings]:
    """Replace the server loop: record the settings the command built instead of serving."""
    seen: list[WorkerSettings] = []
    monkeypatch.setattr(worker_svc.server, "serve", seen.append)
    for name in ("LAYERKV_PORT", "LAYERKV_MODEL", "LAYERKV_GPU_BLOCKS", "LAYERKV_SCHEDULER"):
        monkeypatch.delenv(name, raising=False)
    return seen


def test_worker_flags_reach_the_settings(captured: list[WorkerSettings]) -> None:
    result = CliRunner().invoke(
        app,
        [
            "worker",
            "--host",
            "127.0.0.1",
            "--port",
            "6001",
            "--metrics-port",
            "0",
            "--worker-id",
            "w-7",
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--block-size",
            "8",
            "--gpu-blocks",
            "64",
            "--host-kv-gib",
            "0.5",
            "--staging-blocks",
            "48",
            "--scheduler",
            "sched:50051",
            "--advertise-address",
            "w-7.workers:6001",
            "--admin-token",
            "t0k",
        ],
    )
    assert result.exit_code == 0, result.output
    (s,) = captured
    assert (s.host, s.port, s.metrics_port, s.worker_id) == ("127.0.0.1", 6001, 0, "w-7")
    assert (s.device, s.dtype, s.block_size, s.gpu_blocks, s.host_blocks, s.host_kv_gib) == (
        "cpu",
        "float32",
        8,
        64,
        None,
        0.5,
    )
    assert (s.scheduler, s.advertise_address, s.admin_token) == ("sched:50051", "w-7.workers:6001", "t0k")
    assert s.staging_blocks == 48
    assert engine_config_from_settings(s).staging_blocks == 48  # and on into the engine


def test_worker_reads_layerkv_env_vars(
    captured: list[WorkerSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAYERKV_PORT", "6123")
    monkeypatch.setenv("LAYERKV_GPU_BLOCKS", "99")
    monkeypatch.setenv("LAYERKV_SCHEDULER", "scheduler.ns.svc:50051")
    result = CliRunner().invoke(app, ["worker", "--metrics-port", "0"])
    assert result.exit_code == 0, result.output
    (s,) = captured
    assert (s.port, s.gpu_blocks, s.scheduler, s.model) == (6123, 99, "scheduler.ns.svc:50051", "tiny-llama")


def test_worker_rejects_inconsistent_flags_with_a_message(captured: list[WorkerSettings]) -> None:
    result = CliRunner().invoke(app, ["worker", "--gpu-blocks", "4", "--gpu-kv-gib", "1"])
    assert result.exit_code == 2
    assert "--gpu-blocks" in result.output and "not both" in result.output
    result = CliRunner().invoke(app, ["worker", "--scheduler-identity", "scheduler"])
    assert result.exit_code == 2 and "mutual TLS" in result.output
    assert captured == []
