"""Typed settings: every flag of docs/cli-contract.md has a field, env parsing, cross-field checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.config import SchedulerSettings, WorkerSettings
from common.errors import InvalidArgument

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "cli-contract.md"


def contract_flags(section: str) -> set[str]:
    text = CONTRACT.read_text()
    body = text.split(f"## `layerkv {section}`", 1)[1].split("\n## ", 1)[0]
    flags = set()
    for line in body.splitlines():
        if line.startswith("| `--"):
            flags |= set(re.findall(r"`--([a-z0-9-]+)`", line.split("|")[1]))
    return flags


@pytest.mark.parametrize("section, model", [("scheduler", SchedulerSettings), ("worker", WorkerSettings)])
def test_every_contract_flag_is_a_settings_field(section: str, model: type) -> None:
    flags = contract_flags(section)
    assert len(flags) > 10
    missing = {f for f in flags if f.replace("-", "_") not in model.model_fields}
    assert missing == set()
    for name, info in model.model_fields.items():
        assert info.description, f"{model.__name__}.{name} has no doc line"


def test_from_env_reads_prefixed_variables_and_redis_url() -> None:
    env = {
        "LAYERKV_PORT": "6000",
        "LAYERKV_WORKERS": "a:1, b:2",
        "REDIS_URL": "redis://r:1/2",
        "LAYERKV_POLICY_PARAMS": '{"skip_blocked": true}',
    }
    s = SchedulerSettings.from_env(env)
    assert (s.port, s.workers, s.redis_url) == (6000, ["a:1", "b:2"], "redis://r:1/2")
    assert s.policy_params == {"skip_blocked": True}
    both = SchedulerSettings.from_env({**env, "LAYERKV_REDIS_URL": "redis://mine:1/0"})
    assert both.redis_url == "redis://mine:1/0"  # the LAYERKV_ name wins over REDIS_URL
    w = WorkerSettings.from_env({"LAYERKV_GPU_BLOCKS": "12", "LAYERKV_DEVICE": "cpu"}, port=7)
    assert (w.gpu_blocks, w.device, w.port) == (12, "cpu", 7)


@pytest.mark.parametrize(
    "model, values, fragment",
    [
        (SchedulerSettings, {"port": 70000}, "port"),
        (SchedulerSettings, {"workers": "nohost"}, "'nohost' must be host:port"),
        (SchedulerSettings, {"tls_cert": "c.pem"}, "cert='c.pem', key=''"),
        (SchedulerSettings, {"policy_params": "[1]"}, "JSON object"),
        (SchedulerSettings, {"queue_limit": 0}, "queue_limit"),
        (WorkerSettings, {"gpu_blocks": 10, "gpu_kv_gib": 1.0}, "--gpu-blocks (10) or --gpu-kv-gib (1.0)"),
        (WorkerSettings, {"scheduler_identity": "sched"}, "needs mutual TLS"),
        (WorkerSettings, {"device": "tpu"}, "device"),
    ],
)
def test_bad_settings_name_the_bad_values(model: type, values: dict, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        model.build(**values)
    assert fragment in str(info.value)
