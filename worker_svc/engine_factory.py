"""From the worker's settings (``layerkv worker`` flags) to an ``Engine``.

Only the worker process imports this module (it imports torch through the engine).
"""

from __future__ import annotations

from typing import Any

from common.config import WorkerSettings


def engine_config_from_settings(settings: WorkerSettings) -> Any:
    """The EngineConfig of the settings; "auto" device/dtype and GiB sizes are the engine's to resolve."""
    from worker_svc.engine_config import EngineConfig

    return EngineConfig(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        block_size=settings.block_size,
        gpu_blocks=settings.gpu_blocks,
        host_blocks=settings.host_blocks,
        staging_blocks=settings.staging_blocks,
        gpu_kv_gib=settings.gpu_kv_gib,
        host_kv_gib=settings.host_kv_gib,
        preemption_mode=settings.preemption_mode,
        max_num_batched_tokens=settings.max_num_batched_tokens,
    )


def engine_from_settings(settings: WorkerSettings) -> Any:
    import torch

    from common.threads import threads_for
    from worker_svc.engine import Engine

    torch.set_num_threads(threads_for(settings.threads))  # process-wide: the engine thread too
    return Engine.from_config(engine_config_from_settings(settings))
