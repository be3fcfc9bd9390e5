"""Domain types shared by the scheduler and the workers (torch-free).

The vocabulary follows design.md §3: a *block* holds one layer's K and V for ``block_size`` tokens,
a *placement* says per layer where a request's KV should live, and the *KV geometry* is what a
scheduler needs to count blocks without ever seeing a tensor.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from common.errors import InvalidArgument


class Tier(enum.Enum):
    """Where a layer of a request is placed: the target of a placement."""

    GPU = "G"
    HOST = "H"


class Residency(enum.Enum):
    """Where a layer of a request lives right now (the two tiers plus the transient copy states)."""

    GPU = "gpu"  # in GPU blocks; attention reads it in place
    HOST = "host"  # in host blocks only; must be streamed in before attention
    STORING = "storing"  # in GPU staging blocks, device-to-host copy in flight
    LOADING = "loading"  # host-to-device copy (stream-in or promotion) in flight


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop token was sampled
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the client or the scheduler
    ERROR = "error"  # the worker failed the request


@dataclass(frozen=True)
class Placement:
    """Per-layer target tier of one request; written as letters, one per layer (``"GHGH"``)."""

    tiers: tuple[Tier, ...]

    @classmethod
    def from_letters(cls, letters: str, num_layers: int) -> Placement:
        letters = letters.strip().upper()
        if len(letters) != num_layers or set(letters) - {"G", "H"}:
            raise InvalidArgument(
                f"placement {letters!r} must be {num_layers} letters, each G (GPU) or H (host)"
            )
        return cls(tuple(Tier(c) for c in letters))

    @classmethod
    def all_gpu(cls, num_layers: int) -> Placement:
        return cls((Tier.GPU,) * num_layers)

    @property
    def letters(self) -> str:
        return "".join(t.value for t in self.tiers)

    @property
    def num_layers(self) -> int:
        return len(self.tiers)

    @property
    def gpu_layers(self) -> int:
        return sum(t is Tier.GPU for t in self.tiers)

    @property
    def host_layers(self) -> int:
        return self.num_layers - self.gpu_layers

    def __str__(self) -> str:
        return self.letters


@dataclass(frozen=True)
class KVGeometry:
    """Shape of a worker's paged KV cache: enough to count blocks and bytes without tensors."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block
    dtype_bytes: int  # 4 float32, 2 float16/bfloat16

    @property
    def bytes_per_block(self) -> int:
        """K and V of one layer for ``block_size`` tokens."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def bytes_per_layer(self, num_tokens: int) -> int:
        """K and V of one layer for ``num_tokens`` tokens (no block rounding)."""
        return 2 * num_tokens * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks one layer needs to hold ``num_tokens`` tokens."""
        return math.ceil(num_tokens / self.block_size)

    def blocks_needed(self, num_tokens: int, placement: Placement) -> tuple[int, int]:
        """(GPU blocks, host blocks) a request of ``num_tokens`` tokens needs under ``placement``."""
        per_layer = self.blocks_for(num_tokens)
        return per_layer * placement.gpu_layers, per_layer * placement.host_layers


@dataclass(frozen=True)
class TierCapacity:
    """Total blocks of each tier of one worker."""

    gpu_blocks: int
    host_blocks: int


@dataclass(frozen=True)
class CostModel:
    """A worker's measured performance, the input of placement and SLO-aware admission.

    Prefill time of a batch of ``n`` prompt tokens is
    ``correction * (prefill_base_s + prefill_per_token_s * n + prefill_per_token2_s * n**2)``
    (the quadratic term is attention). A decode step of ``b`` requests holding ``c`` context
    tokens in total and moving ``x`` bytes host-to-device takes
    ``decode_base_s + decode_per_request_s * b + decode_per_context_token_s * c + x / h2d_bytes_per_s``
    (the last term is 0 when ``host_in_place``).
    """

    d2h_bytes_per_s: float = 10e9
    h2d_bytes_per_s: float = 10e9
    prefill_base_s: float = 0.0
    prefill_per_token_s: float = 1e-4
    prefill_per_token2_s: float = 0.0
    decode_base_s: float = 0.01
    decode_per_request_s: float = 0.0
    decode_per_context_token_s: float = 0.0
    correction: float = 1.0  # the paper's factor `a`, fitted online from measured prefills
    # Host-placed layers are read and written in place (a CPU worker: its host tier is the compute
    # device's memory), so they move no bytes: no offload during prefill, no stream-in per step.
    host_in_place: bool = False

    def prefill_s(self, num_tokens: int) -> float:
        n = float(num_tokens)
        raw = self.prefill_base_s + self.prefill_per_token_s * n + self.prefill_per_token2_s * n * n
        return self.correction * raw

    def transfer_s(self, nbytes: int, bytes_per_s: float) -> float:
        """Time to move ``nbytes`` of host-placed KV over a link of ``bytes_per_s`` (0 in place)."""
        return 0.0 if self.host_in_place else nbytes / bytes_per_s

    def decode_step_s(self, batch: int, context_tokens: int, h2d_bytes: int = 0) -> float:
        return (
            self.decode_base_s
            + self.decode_per_request_s * batch
            + self.decode_per_context_token_s * context_tokens
            + self.transfer_s(h2d_bytes, self.h2d_bytes_per_s)
        )


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass, in (0, 1]
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None  # per-request generator seed (reproducible sampling)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # keep generating past the model's end-of-sequence token

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidArgument(f"stop_token_ids must be non-negative, got {list(self.stop_token_ids)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
