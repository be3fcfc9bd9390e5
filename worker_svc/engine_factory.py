"""From the worker's settings (``layerkv worker`` flags) to an ``Engine``: the one place that builds
the EngineConfig of a worker.

Every ``WorkerSettings`` field whose name is an ``EngineConfig`` field is carried over, so an engine
option added to both needs no change here. Only the worker process imports this module (it imports
torch through the engine).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from common.config import WorkerSettings

log = logging.getLogger(__name__)


def engine_config_from_settings(settings: WorkerSettings) -> Any:
    """The EngineConfig of the settings; "auto" device/dtype and GiB sizes are the engine's to resolve."""
    from worker_svc.engine_config import EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{n: getattr(settings, n) for n in type(settings).model_fields if n in names})


def engine_from_settings(settings: WorkerSettings) -> Any:
    import torch

    from common.threads import threads_for
    from worker_svc.engine import Engine

    torch.set_num_threads(threads_for(settings.threads))  # process-wide: the engine thread too
    engine = Engine.from_config(engine_config_from_settings(settings))
    log.info("%s", engine.memory_plan.describe())  # where the device memory went, item by item
    return engine
