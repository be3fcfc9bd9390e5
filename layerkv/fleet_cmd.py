"""``layerkv worker`` (one worker process) and ``layerkv up`` (the embedded default system).

``layerkv up`` starts Redis (``REDIS_URL`` when set, else a ``redis-server`` of its own), one
scheduler and N workers as child processes, waits until the scheduler sees every worker healthy,
prints the endpoints and runs until Ctrl-C/SIGTERM; with ``--demo`` or ``--prompt`` it sends one
request, prints the streamed text and stops everything. torch is imported only by the worker
processes. The options of both commands are generated from common/config.py (``WorkerSettings``;
``UpSettings`` plus every service setting ``up`` passes through to its children).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from common.errors import LayerKVError

if TYPE_CHECKING:
    from common.config import UpSettings


def _run_worker(values: dict[str, Any]) -> None:
    from common.config import WorkerSettings
    from common.logging_setup import setup_logging

    try:
        settings = WorkerSettings.build(**values)
        setup_logging(settings.log_level)
        from worker_svc.server import serve

        serve(settings)
    except LayerKVError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@dataclass(frozen=True)
class UpPlan:
    """What ``layerkv up`` was asked for: its own settings and the flags each kind of child gets."""

    settings: UpSettings
    worker_args: tuple[str, ...]
    scheduler_args: tuple[str, ...]


def up_plan(values: dict[str, Any]) -> UpPlan:
    """Validate ``up``'s options (the pass-through ones by the service settings that take them)."""
    from common.config import SchedulerSettings, UpSettings, WorkerSettings
    from layerkv.settings_cli import passthrough_argv, up_specs

    specs = up_specs()
    own = UpSettings.build(**{s.field: values[s.field] for s in specs.own if s.field in values})
    for cls, child in ((WorkerSettings, specs.worker), (SchedulerSettings, specs.scheduler)):
        cls.build(**{s.field: values.get(s.field, s.default) for s in child})  # names a bad value now
    return UpPlan(own, tuple(passthrough_argv(specs.worker, values)),
                  tuple(passthrough_argv(specs.scheduler, values)))


def _run_up(values: dict[str, Any]) -> None:
    from common.logging_setup import setup_logging
    from layerkv.demo import FALLBACK_MODEL, demo_plan
    from layerkv.embedded import EmbeddedOptions, run_embedded

    setup_logging("WARNING")
    try:
        plan = up_plan(values)
        up = plan.settings
        model, prompt, shown = up.model, up.prompt, up.prompt
        if up.demo and not prompt:
            demo = demo_plan(model)
            model, prompt, shown = demo.model, demo.prompt, demo.shown
            if demo.note:
                typer.echo(demo.note)
        opts = EmbeddedOptions(
            workers=up.workers, model=model or FALLBACK_MODEL, host=up.host, port=up.port,
            metrics_port=up.metrics_port, http_port=up.http_port, redis_url=up.redis_url, prompt=prompt,
            shown_prompt=shown,
            max_tokens=up.max_tokens, startup_timeout_s=up.startup_timeout_s,
            worker_args=plan.worker_args, scheduler_args=plan.scheduler_args,
        )
        code = run_embedded(opts)
    except LayerKVError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    from layerkv.settings_cli import settings_command, up_specs, worker_specs

    app.command("worker")(settings_command(
        worker_specs(), _run_worker, "Run one worker: a LayerKV engine behind the WorkerService gRPC API."))
    app.command("up")(settings_command(
        up_specs().all, _run_up,
        "Start the embedded system: Redis, a scheduler and N workers; Ctrl-C stops everything."))
