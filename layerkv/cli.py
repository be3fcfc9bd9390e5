"""The ``layerkv`` console script.

Each group of subcommands lives in its own module with a ``register(app)`` function. Those modules
import torch (and other heavy libraries) only inside the commands that need them, so the scheduler
starts without torch installed.
"""

from __future__ import annotations

import typer

from layerkv import bench_cmd, fleet_cmd, generate_cmd, scheduler_cmd

app = typer.Typer(
    name="layerkv",
    help="LayerKV serving: layer-wise KV cache management and SLO-aware scheduling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (generate_cmd, scheduler_cmd, fleet_cmd, bench_cmd):
    module.register(app)


def main() -> None:
    app()
