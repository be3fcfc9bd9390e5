"""The engine's typed configuration, and how it turns into tier capacities on a device."""

from __future__ import annotations

from dataclasses import dataclass

from common.cost_profile import PROFILE_MODES
from common.errors import InvalidArgument

PLACEMENT_DEFAULTS = ("auto", "all-gpu", "rule")
PREEMPTION_MODES = ("recompute", "swap-layers")


@dataclass(frozen=True)
class EngineConfig:
    """How to build an engine. Every field has a constraint checked in ``__post_init__``."""

    model: str = "tiny-llama"  # a preset name or a local HF folder
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when available)
    dtype: str = "float32"  # float32 | float16 | bfloat16 | auto (bfloat16 on CUDA, float32 on CPU)
    block_size: int = 16  # tokens per KV block, >= 1
    gpu_blocks: int | None = None  # GPU-tier blocks; None: what fits (CUDA) or a fixed budget (CPU)
    host_blocks: int | None = None  # host-tier blocks; None: a default budget of host memory
    gpu_kv_gib: float | None = None  # GPU tier in GiB instead of blocks
    host_kv_gib: float | None = None  # host tier in GiB instead of blocks
    staging_blocks: int | None = None  # GPU staging blocks for host layers; None: sized from the GPU tier
    seed: int = 0  # random weights of presets and default sampling seeds
    max_model_len: int | None = None  # cap on prompt + max_tokens; None: the model's limit
    max_num_seqs: int = 256  # most requests holding blocks at once
    max_prefill_tokens: int = 8192  # prefill tokens in one step, within max_num_batched_tokens
    max_num_batched_tokens: int = 2048  # tokens per step: decodes first, then prefill chunks (vLLM's)
    preemption_mode: str = "recompute"  # default for requests that name none: recompute | swap-layers
    max_promotions_per_step: int = 2  # host layers promoted back to GPU per decode step
    attention_backend: str = "auto"  # auto | sdpa | flash-attn
    default_placement: str = "auto"  # for requests without a placement: auto | all-gpu | rule
    profile: str = "off"  # cost model at start-up: off (defaults) | startup (measure) | file (load/save)
    profile_file: str = ""  # the saved profile of profile="file"
    profile_budget_s: float = 1.0  # soft time limit of one profile (one pass always runs)
    gpu_memory_utilization: float = 0.9  # share of free CUDA memory the engine may use

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise InvalidArgument(f"block_size must be >= 1, got {self.block_size}")
        for name in ("gpu_blocks", "host_blocks", "staging_blocks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {value}")
        if self.gpu_blocks is not None and self.gpu_kv_gib is not None:
            raise InvalidArgument("give gpu_blocks or gpu_kv_gib, not both")
        if self.host_blocks is not None and self.host_kv_gib is not None:
            raise InvalidArgument("give host_blocks or host_kv_gib, not both")
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1 or self.max_promotions_per_step < 0:
            raise InvalidArgument("max_num_seqs and max_prefill_tokens must be >= 1, "
                                  "max_promotions_per_step >= 0")
        if self.max_num_batched_tokens < 1:
            raise InvalidArgument(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise InvalidArgument(f"preemption_mode {self.preemption_mode!r} must be one of "
                                  f"{', '.join(PREEMPTION_MODES)}")
        if self.default_placement not in PLACEMENT_DEFAULTS:
            raise InvalidArgument(f"default_placement {self.default_placement!r} must be one of "
                                  f"{', '.join(PLACEMENT_DEFAULTS)}")
        if self.attention_backend not in ("auto", "sdpa", "flash-attn"):
            raise InvalidArgument(
                f"attention_backend {self.attention_backend!r} must be auto, sdpa or flash-attn")
        if self.profile not in PROFILE_MODES:
            raise InvalidArgument(f"profile {self.profile!r} must be one of {', '.join(PROFILE_MODES)}")
        if self.profile == "file" and not self.profile_file:
            raise InvalidArgument("profile='file' needs profile_file (where the profile is saved)")
        if not self.profile_budget_s > 0.0:
            raise InvalidArgument(f"profile_budget_s must be > 0, got {self.profile_budget_s}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidArgument(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class TierSizes:
    gpu_blocks: int
    host_blocks: int
    staging_blocks: int


GIB = 1 << 30
CPU_DEFAULT_TIER_BYTES = 1 * GIB  # per tier, when nothing is configured on a CPU device
HOST_DEFAULT_TIER_BYTES = 16 * GIB  # host tier next to a GPU


def size_tiers(config: EngineConfig, bytes_per_block: int, blocks_per_request: int,
               num_layers: int, cuda_free_bytes: int | None, activation_bytes: int) -> TierSizes:
    """Blocks of each tier. ``blocks_per_request``: one layer of a max_model_len request."""
    if config.gpu_blocks is not None:
        gpu = config.gpu_blocks
    elif config.gpu_kv_gib is not None:
        gpu = int(config.gpu_kv_gib * GIB) // bytes_per_block
    elif cuda_free_bytes is not None:
        usable = int(cuda_free_bytes * config.gpu_memory_utilization) - activation_bytes
        gpu = max(0, usable // bytes_per_block * 7 // 8)  # the rest goes to staging below
    else:
        gpu = min(CPU_DEFAULT_TIER_BYTES // bytes_per_block, 8 * num_layers * blocks_per_request)
    if config.host_blocks is not None:
        host = config.host_blocks
    elif config.host_kv_gib is not None:
        host = int(config.host_kv_gib * GIB) // bytes_per_block
    else:
        budget = HOST_DEFAULT_TIER_BYTES if cuda_free_bytes is not None else CPU_DEFAULT_TIER_BYTES
        host = min(budget // bytes_per_block, 8 * num_layers * blocks_per_request)
    if config.staging_blocks is not None:
        staging = config.staging_blocks
    else:  # two layers of a longest request, or an eighth of the GPU tier if larger
        staging = max(2 * blocks_per_request, gpu // 8)
    return TierSizes(gpu, host, staging)
