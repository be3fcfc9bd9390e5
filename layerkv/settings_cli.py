"""CLI options generated from the pydantic settings in common/config.py: one flag per field, named
``--field-name``, read also from ``LAYERKV_FIELD_NAME`` (and the field's aliases), the field's
description as help. A field added to the settings becomes a flag with no change here.

Lists are given comma-separated and dicts as JSON (the settings' validators parse them); ``Literal``
fields become a choice; ``X | None`` fields default to None (automatic).
"""

from __future__ import annotations

import enum
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from common.config import env_names


@dataclass(frozen=True)
class OptionSpec:
    """One generated option: the settings field, its flag, env vars, CLI type, default and help."""

    field: str
    flag: str
    envvars: tuple[str, ...]
    cli_type: type
    optional: bool  # None is allowed (and is the default)
    default: Any
    choices: tuple[str, ...]
    help: str
    panel: str = ""  # help section (``up``: the options passed to the workers / the scheduler)
    constraint: str = ""  # the field's bounds as text, e.g. ">= 1, <= 1024"

    @property
    def shown_default(self) -> str:
        if self.default is None:
            return "automatic"
        if self.cli_type is bool:
            return "on" if self.default else "off"
        return str(self.default) if self.default != "" else "empty"


def _cli_type(annotation: Any) -> tuple[type, bool, tuple[str, ...]]:
    """(type the CLI parses, None allowed, choices) of a field annotation."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        cli, _, choices = _cli_type(inner[0] if len(inner) == 1 else str)
        return cli, True, choices
    if origin is typing.Literal:
        return str, False, tuple(str(a) for a in args)
    if annotation in (bool, int, float, str):
        return annotation, False, ()
    return str, False, ()  # lists (comma-separated), dicts (JSON), anything else: text


def _cli_default(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <=",
           "pattern": "matches"}


def _constraint(metadata: list[Any]) -> str:
    """``Field(ge=1, le=1024)`` -> ">= 1, <= 1024" (pydantic keeps bounds as annotated-types objects)."""
    parts = []
    for item in metadata:
        for attr, word in _BOUNDS.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{word} {value}")
    return ", ".join(parts)


def option_specs(settings: type[BaseModel], fields: Iterable[str] | None = None) -> list[OptionSpec]:
    """The options of ``settings`` (all fields, or ``fields`` in the settings' order)."""
    wanted = None if fields is None else set(fields)
    specs = []
    for name, info in settings.model_fields.items():
        if wanted is not None and name not in wanted:
            continue
        cli_type, optional, choices = _cli_type(info.annotation)
        default = info.get_default(call_default_factory=True)
        if default is PydanticUndefined:
            raise TypeError(f"setting {settings.__name__}.{name} needs a default to be a CLI option")
        specs.append(OptionSpec(
            field=name, flag="--" + name.replace("_", "-"), envvars=env_names(name), cli_type=cli_type,
            optional=optional, default=_cli_default(default), choices=choices,
            help=info.description or name.replace("_", " "), constraint=_constraint(info.metadata)))
    return specs


def settings_command(specs: list[OptionSpec], body: Callable[[dict[str, Any]], None],
                     doc: str) -> Callable[..., None]:
    """A typer command whose options are ``specs``; it calls ``body`` with {field: value}."""
    params = []
    for spec in specs:
        names = [f"{spec.flag}/--no-{spec.flag[2:]}"] if spec.cli_type is bool else [spec.flag]
        shown: bool | str = spec.shown_default if spec.default in (None, "") else True
        option = typer.Option(*names, envvar=list(spec.envvars), help=spec.help, case_sensitive=False,
                              show_default=shown, rich_help_panel=spec.panel or None)
        hint: Any = spec.cli_type
        default = spec.default
        if spec.choices:  # typer shows and checks an Enum's values as a choice
            choice: Any = enum.Enum(spec.field, {c: c for c in spec.choices}, type=str)  # type: ignore[misc]
            hint, default = choice, None if default is None else choice(default)
        hint = hint | None if spec.optional else hint
        params.append(inspect.Parameter(spec.field, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[hint, option]))

    def command(**values: Any) -> None:
        body({k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()})

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


def passthrough_argv(specs: list[OptionSpec], values: dict[str, Any]) -> list[str]:
    """Flags for the options in ``values`` that differ from their default (for a child process)."""
    argv: list[str] = []
    for spec in specs:
        value = values.get(spec.field, spec.default)
        if value is None or value == spec.default:
            continue
        if spec.cli_type is bool:
            argv.append(spec.flag if value else f"--no-{spec.flag[2:]}")
        else:
            argv += [spec.flag, str(value)]
    return argv


def scheduler_specs() -> list[OptionSpec]:
    from common.config import SchedulerSettings

    return option_specs(SchedulerSettings)


def worker_specs() -> list[OptionSpec]:
    from common.config import WorkerSettings

    return option_specs(WorkerSettings)


@dataclass(frozen=True)
class UpSpecs:
    """``layerkv up``'s options: its own, and those passed through to the workers / the scheduler."""

    own: list[OptionSpec]
    worker: list[OptionSpec]
    scheduler: list[OptionSpec]

    @property
    def all(self) -> list[OptionSpec]:
        """Every option once (a field both services have is one flag, passed to both)."""
        seen: dict[str, OptionSpec] = {}
        for spec in self.own + self.worker + self.scheduler:
            seen.setdefault(spec.field, spec)
        return list(seen.values())


def up_specs() -> UpSpecs:
    from dataclasses import replace

    from common.config import SchedulerSettings, UpSettings, WorkerSettings, up_passthrough

    through = up_passthrough()

    def child(cls: type[BaseModel], panel: str) -> list[OptionSpec]:
        fields = [f for f, classes in through.items() if cls in classes]
        return [replace(s, panel=panel) for s in option_specs(cls, fields)]

    return UpSpecs(option_specs(UpSettings), child(WorkerSettings, "Passed to every worker"),
                   child(SchedulerSettings, "Passed to the scheduler"))
