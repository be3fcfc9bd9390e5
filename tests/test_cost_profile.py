"""The saved profile (``--profile file``): its JSON round-trip, bad files named in the error, the
worker's --profile flags and their checks, and an engine that measures-and-saves once and then
loads, but never loads a profile measured for another engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import worker_svc.server
from common.config import WorkerSettings
from common.cost_profile import CostProfile, ProfileInfo, ProfileKey, ProfileSource
from common.errors import InvalidArgument
from common.types import CostModel
from layerkv.cli import app
from tests.fleet import TINY
from worker_svc.engine import Engine, EngineConfig

KEY = ProfileKey(model="tiny-llama", device="cpu", dtype="float32", num_layers=4, block_size=16)
MEASURED = CostProfile(
    CostModel(d2h_bytes_per_s=3e9, h2d_bytes_per_s=2.5e9, prefill_base_s=0.004, prefill_per_token_s=3e-4,
              prefill_per_token2_s=1e-8, decode_base_s=0.006, decode_per_request_s=1e-4,
              decode_per_context_token_s=2e-6),
    ProfileInfo(ProfileSource.MEASURED, duration_s=0.9, measured_unix_s=1.7e9),
    KEY,
)


def test_a_saved_profile_loads_back_as_the_same_cost_model(tmp_path: Path) -> None:
    path = tmp_path / "profiles" / "w0.json"  # the folder is created
    MEASURED.save(path)
    loaded = CostProfile.load(path)
    assert loaded.cost_model == MEASURED.cost_model and loaded.key == KEY
    assert loaded.info == ProfileInfo(ProfileSource.FILE, 0.9, 1.7e9)  # measured then, loaded now
    assert json.loads(path.read_text())["cost_model"]["decode_base_s"] == 0.006  # small, readable JSON
    assert [p.name for p in path.parent.iterdir()] == ["w0.json"]  # no temporary file left behind


@pytest.mark.parametrize("text, problem", [
    ("{not json", "is not JSON"),
    ('{"format": 7, "cost_model": {}}', "format 7"),
    ('[1, 2]', "not a cost profile"),
    ('{"format": 1, "cost_model": {"decode_base_s": -1}}', "decode_base_s must be a finite number >= 0"),
    ('{"format": 1, "cost_model": {"decode_base_s": "fast"}}', "decode_base_s must be a finite number"),
    ('{"format": 1, "cost_model": {"d2h_bytes_per_s": 0}}', "d2h_bytes_per_s must be > 0"),
    ('{"format": 1, "cost_model": {"warp": 9}}', "unknown cost_model fields ['warp']"),
    ('{"format": 1, "cost_model": {}, "key": {"model": "x"}}', "key must name"),
])  # fmt: skip
def test_a_bad_profile_file_is_refused_naming_it(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=r"bad\.json") as err:
        CostProfile.load(path)
    assert problem in str(err.value)


def test_profile_flags_default_and_checks() -> None:
    assert WorkerSettings().profile == "startup"  # the worker profiles at start-up unless told otherwise
    ok = WorkerSettings.build(profile="file", profile_file="p.json", profile_budget_s=0.5)
    assert (ok.profile, ok.profile_file, ok.profile_budget_s) == ("file", "p.json", 0.5)
    with pytest.raises(InvalidArgument, match="--profile file needs --profile-file"):
        WorkerSettings.build(profile="file")
    only_with_file = re.escape("--profile-file='p.json' is read only with --profile file")
    with pytest.raises(InvalidArgument, match=only_with_file):
        WorkerSettings.build(profile="startup", profile_file="p.json")
    with pytest.raises(InvalidArgument, match="profile"):
        WorkerSettings.build(profile="sometimes")
    with pytest.raises(InvalidArgument, match="profile_budget_s"):
        WorkerSettings.build(profile_budget_s=0)
    with pytest.raises(InvalidArgument, match="profile 'sometimes' must be one of off, startup, file"):
        EngineConfig(profile="sometimes")
    with pytest.raises(InvalidArgument, match="profile_file"):
        EngineConfig(profile="file")


def test_worker_command_line_profile_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[WorkerSettings] = []
    monkeypatch.setattr(worker_svc.server, "serve", seen.append)
    for name in ("LAYERKV_PROFILE", "LAYERKV_PROFILE_FILE"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["worker", "--profile", "file", "--profile-file", "w.json"])
    assert result.exit_code == 0, result.output
    assert (seen[-1].profile, seen[-1].profile_file) == ("file", "w.json")
    result = runner.invoke(app, ["worker", "--profile", "off", "--profile", "startup"])  # the last one wins
    assert result.exit_code == 0 and seen[-1].profile == "startup"
    result = runner.invoke(app, ["worker", "--profile", "file"])
    assert result.exit_code == 2 and "--profile-file" in result.output
    result = runner.invoke(app, ["worker", "--profile", "always"])
    assert result.exit_code != 0 and "always" in result.output
    assert len(seen) == 2


def _engine(path: Path, block_size: int = 16) -> Engine:
    return Engine.from_config(EngineConfig(model=TINY, device="cpu", dtype="float32", block_size=block_size,
                                           gpu_blocks=256, host_blocks=256, max_model_len=512,
                                           profile="file", profile_file=str(path), profile_budget_s=0.3))


def test_file_mode_measures_and_saves_once_then_loads(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    first = _engine(path)
    assert first.cost_profile.info.source is ProfileSource.MEASURED and path.exists()
    second = _engine(path)
    assert second.cost_profile.info.source is ProfileSource.FILE
    assert second.cost_model == first.cost_model  # reused, not re-measured
    assert second.cost_profile.info.measured_unix_s == first.cost_profile.info.measured_unix_s
    with pytest.raises(InvalidArgument, match=r"was measured for .*block_size=16.*block_size=8"):
        _engine(path, block_size=8)  # another engine: never applied to it


def test_an_unwritable_profile_file_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("")
    with pytest.raises(InvalidArgument, match=r"cannot write profile file .*plain-file/profile\.json"):
        _engine(tmp_path / "plain-file" / "profile.json")  # its folder is a file
