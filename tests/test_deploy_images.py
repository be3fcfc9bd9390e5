"""The container images, checked statically (no Docker engine here): each Dockerfile is parsed into
its instructions, and the build context (.dockerignore) and the core dependencies are checked for
what the images rely on: non-root, a health check, the `layerkv scheduler|worker` entry points, and
no torch in the scheduler image.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
CONTRACT = REPO / "docs" / "cli-contract.md"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str  # upper case, e.g. "RUN"
    args: str
    stage: int  # index of the FROM it belongs to


def parse_dockerfile(path: Path) -> list[Instruction]:
    joined: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    out: list[Instruction] = []
    stage = -1
    for line in joined:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"not exec form: {args}"
    return [str(a) for a in parsed]


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ARG" and "=" in i.args:
            name, _, value = i.args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """Argument lists of every `pip install` in RUN instructions (split at &&, ;)."""
    found: list[list[str]] = []
    for i in instructions:
        if i.keyword != "RUN":
            continue
        lexer = shlex.shlex(i.args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word in {"&&", "||", ";", "then", "fi"}:  # one simple command ends
                while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):
                    command = command[1:]  # leading VAR=value assignments
                if command[:2] == ["pip", "install"]:
                    found.append([w for w in command[2:] if not w.startswith("-")])
                command = []
            else:
                command.append(word)
    return found


def contract_default(command: str, flag: str) -> str:
    section = CONTRACT.read_text().split(f"## `layerkv {command}`", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and f"`{flag}`" in cells[1]:
            defaults = re.findall(r"`([^`]*)`", cells[3])
            flags = re.findall(r"`(--[a-z0-9-]+)`", cells[1])
            return defaults[flags.index(flag)]
    raise AssertionError(f"{flag} not in the {command} table of docs/cli-contract.md")


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(("image", "command"), [("scheduler", "scheduler"), ("worker", "worker")])
def test_image_is_non_root_with_healthcheck_and_cli_entrypoint(image: str, command: str) -> None:
    instructions = parse_dockerfile(DOCKER / f"{image}.Dockerfile")
    final = final_stage(instructions)
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it, and not root.
    assert uid.isdigit() and int(uid) != 0
    assert int(uid) == 10001  # the chart's podSecurityContext.runAsUser

    entrypoint = [i for i in final if i.keyword == "ENTRYPOINT"]
    assert exec_form(entrypoint[-1].args) == ["layerkv", command]

    healthchecks = [i for i in final if i.keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    cmd = healthchecks[0].args.split(" CMD ", 1)[1]
    probe = exec_form(cmd)
    assert probe[0] == "python"
    copied = [i.args.split()[-1] for i in final if i.keyword == "COPY" and "healthcheck.py" in i.args]
    assert probe[1] in copied, "the health check script is not copied into the final stage"

    # The port the health check dials (LAYERKV_PORT) and the exposed ports are the CLI defaults.
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    port = contract_default(command, "--port")
    assert f"LAYERKV_PORT={port}" in env
    exposed = set(" ".join(i.args for i in final if i.keyword == "EXPOSE").split())
    assert exposed == {port, contract_default(command, "--metrics-port")}


def test_scheduler_image_installs_no_torch() -> None:
    instructions = parse_dockerfile(DOCKER / "scheduler.Dockerfile")
    installs = pip_installs(instructions)
    # Exactly the project, without extras: the core dependencies only.
    assert installs == [["."]]
    assert not any("torch" in i.args for i in instructions if i.keyword in {"FROM", "ENV", "ARG"})


def test_core_dependencies_do_not_pull_torch() -> None:
    """Walk the installed metadata of the core dependencies (extras off): no torch anywhere."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    queue = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    seen: set[str] = set()
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        assert name != "torch", "a core dependency pulls torch into the scheduler image"
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # platform-specific dependency not installed here (e.g. uvloop on Windows)
        queue.extend(Requirement(r) for r in requires)
    assert {"grpcio", "redis", "pydantic"} <= seen


def test_worker_image_pins_torch_and_gates_flash_attn() -> None:
    instructions = parse_dockerfile(DOCKER / "worker.Dockerfile")
    assert all(i.args.startswith("nvidia/cuda:") for i in instructions if i.keyword == "FROM")
    args = arg_defaults(instructions)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert args["WITH_FLASH_ATTN"] == "0"
    installs = pip_installs(instructions)
    assert ["torch==${TORCH_VERSION}", ".[worker]"] in installs
    flash_runs = [i for i in instructions if i.keyword == "RUN" and "FLASH_ATTN_SPEC" in i.args]
    assert len(flash_runs) == 1
    assert flash_runs[0].args.startswith('if [ "${WITH_FLASH_ATTN}" = "1" ]; then')
    # No unpinned torch anywhere.
    for words in installs:
        assert not [w for w in words if re.fullmatch(r"torch([<>=!~].*)?", w) and "==" not in w]


@pytest.mark.parametrize("image", ["scheduler", "worker"])
def test_build_context_holds_what_the_dockerfile_copies(image: str) -> None:
    for i in parse_dockerfile(DOCKER / f"{image}.Dockerfile"):
        if i.keyword != "COPY" or i.args.startswith("--from"):
            continue
        *sources, _dest = i.args.split()
        for source in sources:
            assert (REPO / source).exists(), f"{image}: COPY {source} does not exist"
            assert not dockerignore_excludes(source), f"{image}: .dockerignore drops {source}"


def test_dockerignore_keeps_the_context_small() -> None:
    assert not dockerignore_excludes("common/types.py")
    assert not dockerignore_excludes("deploy/docker/healthcheck.py")
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "common/__pycache__/x.pyc"):
        assert dockerignore_excludes(heavy), heavy
