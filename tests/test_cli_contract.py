"""One source for settings: the CLI options of ``scheduler``/``worker``/``up`` are generated from the
pydantic settings (flag + env var each, help from the description), docs/cli-contract.md equals the
generated text, a new settings field becomes a flag by itself, ``up`` passes service settings
through to its children, and the worker's EngineConfig is built in one place from its settings."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from common.config import SchedulerSettings, UpSettings, WorkerSettings, up_passthrough
from layerkv import cli_contract, fleet_cmd
from layerkv.cli import app
from layerkv.settings_cli import option_specs, settings_command, up_specs


def test_committed_contract_equals_the_generated_one() -> None:
    assert cli_contract.DOC.read_text(encoding="utf-8") == cli_contract.render(), (
        "docs/cli-contract.md is stale: run `python -m layerkv.cli_contract`")
    assert cli_contract.main(["--check"]) == 0


@pytest.mark.parametrize(("command", "settings"),
                         [("scheduler", SchedulerSettings), ("worker", WorkerSettings), ("up", UpSettings)])
def test_every_setting_is_a_flag_with_its_env_var_and_help(command: str, settings: type) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name, info in settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in result.output, f"{settings.__name__}.{name} has no {flag}"
        assert f"LAYERKV_{name.upper()}" in result.output
        assert info.description and info.description.split()[0] in result.output


def test_up_offers_every_service_setting_it_does_not_set_itself() -> None:
    through = up_passthrough()
    flags = {s.field for s in up_specs().all}
    for cls in (WorkerSettings, SchedulerSettings):
        for name in cls.model_fields:
            if name not in UpSettings.model_fields and name in through:
                assert name in flags
    assert {"device", "block_size", "max_num_seqs"} <= {s.field for s in up_specs().worker}
    assert {"queue_limit", "policy", "default_max_tokens"} <= {s.field for s in up_specs().scheduler}
    assert "port" not in through and "admin_token" not in through  # up sets these per child


def test_a_new_settings_field_becomes_a_flag_and_an_env_var() -> None:
    class Extended(WorkerSettings):
        preemption_mode: str = Field("recompute", pattern="^(recompute|swap-layers)$",
                                     description="what a worker does when decode outgrows its blocks")
        max_num_batched_tokens: int | None = Field(None, ge=1, description="tokens per step")

    seen: list[Any] = []
    extra = typer.Typer()
    extra.command()(settings_command(option_specs(Extended), lambda v: seen.append(Extended.build(**v)), "x"))
    runner = CliRunner()
    result = runner.invoke(extra, ["--preemption-mode", "swap-layers"],
                           env={"LAYERKV_MAX_NUM_BATCHED_TOKENS": "512"})
    assert result.exit_code == 0, result.output
    assert seen[-1].preemption_mode == "swap-layers" and seen[-1].max_num_batched_tokens == 512
    assert "what a worker does" in runner.invoke(extra, ["--help"], env={"COLUMNS": "250"}).output


def test_scheduler_flags_and_env_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SchedulerSettings] = []
    import scheduler_svc.server

    async def fake_serve(settings: SchedulerSettings) -> None:
        seen.append(settings)

    monkeypatch.setattr(scheduler_svc.server, "serve", fake_serve)
    result = CliRunner().invoke(app, ["scheduler", "--port", "0", "--workers", "a:1,b:2",
                                      "--queue-limit", "7", "--policy-params", '{"slo_tpot_s": 0.2}',
                                      "--log-level", "warning"],
                                env={"LAYERKV_DEFAULT_MAX_TOKENS": "99", "REDIS_URL": "redis://r:1/0"})
    assert result.exit_code == 0, result.output
    s = seen[-1]
    assert (s.port, s.workers, s.queue_limit, s.default_max_tokens, s.log_level) == (
        0, ["a:1", "b:2"], 7, 99, "WARNING")
    assert s.policy_params == {"slo_tpot_s": 0.2} and s.redis_url == "redis://r:1/0"
    bad = CliRunner().invoke(app, ["scheduler", "--queue-limit", "0"])
    assert bad.exit_code == 1 and "queue_limit" in bad.output


def test_up_passes_changed_service_settings_to_the_children() -> None:
    values = {s.field: s.default for s in up_specs().all}
    values.update(workers=3, block_size=8, profile="off", queue_limit=5, dtype="float32")
    plan = fleet_cmd.up_plan(values)
    assert plan.settings.workers == 3
    assert set(plan.worker_args) == {"--block-size", "8", "--profile", "off", "--dtype", "float32"}
    assert plan.scheduler_args == ("--queue-limit", "5")
    with pytest.raises(Exception, match="block_size"):
        fleet_cmd.up_plan({**values, "block_size": 0})


def test_engine_config_carries_every_engine_setting_of_the_worker() -> None:
    from worker_svc.engine_config import EngineConfig
    from worker_svc.engine_factory import engine_config_from_settings

    shared = {f.name for f in dataclasses.fields(EngineConfig)} & set(WorkerSettings.model_fields)
    assert {"model", "block_size", "max_num_seqs", "default_placement", "seed"} <= shared
    settings = WorkerSettings.build(model="smollm2", block_size=8, gpu_blocks=10, max_num_seqs=3,
                                    max_prefill_tokens=99, default_placement="all-gpu", seed=4,
                                    gpu_memory_utilization=0.5, attention_backend="sdpa", max_model_len=77,
                                    profile="file", profile_file="saved.json", profile_budget_s=0.5)
    config = engine_config_from_settings(settings)
    for name in shared:
        assert getattr(config, name) == getattr(settings, name), name
