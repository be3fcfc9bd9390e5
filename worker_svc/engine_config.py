"""The engine's typed configuration (``plan_inputs``: what of it the device-memory plan reads)."""

from __future__ import annotations

from dataclasses import dataclass

from common.cost_profile import PROFILE_MODES
from common.errors import InvalidArgument
from worker_svc.memory_plan import PlanInputs

PLACEMENT_DEFAULTS = ("auto", "all-gpu", "rule")
PREEMPTION_MODES = ("recompute", "swap-layers")
HOST_ACCESS_MODES = ("auto", "stream", "direct")


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
    staging_blocks: int | None = None  # GPU staging blocks for host layers; None: sized from the host tier
    seed: int = 0  # random weights of presets and default sampling seeds
    max_model_len: int | None = None  # cap on prompt + max_tokens; None: the model's limit
    max_num_seqs: int = 256  # most requests holding blocks at once
    max_prefill_tokens: int = 8192  # prefill tokens in one step, within max_num_batched_tokens
    max_num_batched_tokens: int = 2048  # tokens per step: decodes first, then prefill chunks (vLLM's)
    preemption_mode: str = "recompute"  # default for requests that name none: recompute | swap-layers
    max_promotions_per_step: int = 2  # host layers promoted back to GPU per decode step (stream only)
    # How attention reads host-placed layers: stream (through staging) | direct (in place: the
    # host tier is the compute device's memory, CPU only) | auto (direct on CPU, stream on CUDA)
    host_access: str = "auto"
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
        if self.host_access not in HOST_ACCESS_MODES:
            raise InvalidArgument(
                f"host_access {self.host_access!r} must be one of {', '.join(HOST_ACCESS_MODES)}")
        if self.host_access == "direct" and self.device not in ("cpu", "auto"):
            raise InvalidArgument(f"host_access='direct' reads host KV in place, which needs device='cpu' "
                                  f"(got {self.device!r}); on CUDA host-placed layers are streamed")
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


def reads_host_in_place(config: EngineConfig, device_type: str) -> bool:
    """Whether host-placed layers are read in place (no staging) on a device of ``device_type``."""
    if config.host_access == "direct" and device_type != "cpu":
        raise InvalidArgument(f"host_access='direct' needs the CPU device, the engine runs on {device_type}")
    return config.host_access == "direct" or (config.host_access == "auto" and device_type == "cpu")


def plan_inputs(config: EngineConfig, max_model_len: int, weight_bytes: int,
                backend: str, host_in_place: bool = False) -> PlanInputs:
    """What ``worker_svc.memory_plan`` needs from the config (``backend``: the attention backend's
    name; flash-attn reads the cache in place when the block size is one its paged kernel takes:
    a multiple of 256, see ``worker_svc.attention.FlashAttnBackend``). ``host_in_place``: host
    layers are read in place, so there is no staging pool."""
    return PlanInputs(
        max_model_len=max_model_len, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        gpu_memory_utilization=config.gpu_memory_utilization, weight_bytes=weight_bytes,
        paged_decode=backend == "flash-attn" and config.block_size % 256 == 0,
        gpu_blocks=config.gpu_blocks, gpu_kv_gib=config.gpu_kv_gib, host_blocks=config.host_blocks,
        host_kv_gib=config.host_kv_gib, staging_blocks=0 if host_in_place else config.staging_blocks)
