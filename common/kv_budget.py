"""Block arithmetic shared by every piece that counts KV blocks (torch-free).

How many blocks a request needs per layer and tier under a placement, how many more decode growth
takes, and the staging rule for host-placed layers. The scheduler's ledger, every policy, the
worker's KV manager and the stub worker all count with these functions, so their books agree by
construction instead of by keeping five copies in step.

The staging rule: a host-placed layer is computed in GPU staging blocks (prefill writes there and
offloads; decode streams it in one layer ahead), so at any moment two adjacent layers may hold
staging blocks at once. A set of requests fits when, for every pair of adjacent layers, the
host-placed blocks of both layers fit in the staging pool.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from operator import add

from common.types import KVGeometry, Placement, Tier, TierCapacity


@dataclass(frozen=True)
class BlockDemand:
    """Blocks per layer in each tier for one request (or a sum of requests)."""

    gpu_per_layer: tuple[int, ...]
    host_per_layer: tuple[int, ...]

    @property
    def gpu_blocks(self) -> int:
        return sum(self.gpu_per_layer)

    @property
    def host_blocks(self) -> int:
        return sum(self.host_per_layer)

    def __add__(self, other: BlockDemand) -> BlockDemand:
        assert len(self.gpu_per_layer) == len(other.gpu_per_layer), "demands of different depths"
        return BlockDemand(
            tuple(a + b for a, b in zip(self.gpu_per_layer, other.gpu_per_layer, strict=True)),
            tuple(a + b for a, b in zip(self.host_per_layer, other.host_per_layer, strict=True)),
        )

    @classmethod
    def zero(cls, num_layers: int) -> BlockDemand:
        return cls((0,) * num_layers, (0,) * num_layers)


def blocks_per_layer(geometry: KVGeometry, num_tokens: int) -> int:
    """Blocks one layer needs to hold ``num_tokens`` tokens."""
    return geometry.blocks_for(max(0, num_tokens))


def demand(geometry: KVGeometry, num_tokens: int, placement: Placement) -> BlockDemand:
    """Blocks a request holding ``num_tokens`` tokens takes under ``placement``."""
    assert placement.num_layers == geometry.num_layers, (
        f"placement {placement} has {placement.num_layers} layers, the geometry {geometry.num_layers}")
    n = blocks_per_layer(geometry, num_tokens)
    return BlockDemand(
        tuple(n if t is Tier.GPU else 0 for t in placement.tiers),
        tuple(n if t is Tier.HOST else 0 for t in placement.tiers),
    )


def growth_per_layer(geometry: KVGeometry, from_tokens: int, to_tokens: int) -> int:
    """Blocks each layer must add for a request to grow from ``from_tokens`` to ``to_tokens``."""
    return max(0, blocks_per_layer(geometry, to_tokens) - blocks_per_layer(geometry, from_tokens))


def growth(geometry: KVGeometry, from_tokens: int, to_tokens: int, placement: Placement) -> BlockDemand:
    """Blocks per tier and layer a request must add to grow from ``from_tokens`` to ``to_tokens``."""
    n = growth_per_layer(geometry, from_tokens, to_tokens)
    return BlockDemand(
        tuple(n if t is Tier.GPU else 0 for t in placement.tiers),
        tuple(n if t is Tier.HOST else 0 for t in placement.tiers),
    )


def headroom(
    geometry: KVGeometry, context_tokens: int, headroom_tokens: int, end_tokens: int, placement: Placement
) -> BlockDemand:
    """Growth blocks kept free for a request beyond the ``context_tokens`` it holds.

    ``headroom_tokens`` of growth ahead of the current context, never past ``end_tokens`` (prompt
    plus max_tokens: the request cannot grow further). ``headroom_tokens >= end - context`` is the
    whole-request reservation; 0 is none (vLLM's rule: grow on demand, preempt when short).
    """
    target = max(context_tokens, min(context_tokens + max(0, headroom_tokens), end_tokens))
    return growth(geometry, context_tokens, target, placement)


def staging_needed(host_per_layer: Sequence[int]) -> int:
    """Staging blocks the host-placed blocks ``host_per_layer`` need: the largest adjacent pair."""
    if not host_per_layer:
        return 0
    if len(host_per_layer) == 1:
        return host_per_layer[0]
    # one C-level map, not a generator over pairs: the KV manager asks this on every growth of a
    # request with host layers (a frame per pair cost ~16 rows' worth of a decode step)
    return max(map(add, host_per_layer, itertools.islice(host_per_layer, 1, None)))


def staging_fits(host_per_layer: Sequence[int], staging_blocks: int) -> bool:
    """Whether host-placed blocks ``host_per_layer`` (all requests together) fit the staging pool."""
    return staging_needed(host_per_layer) <= staging_blocks


def never_fits(
    geometry: KVGeometry, num_tokens: int, placement: Placement, capacity: TierCapacity,
    staging_blocks: int | None
) -> str | None:
    """Why a request of ``num_tokens`` tokens cannot be held even by an empty worker, or ``None``.
    ``staging_blocks`` None: host layers are read in place (no staging rule)."""
    need = demand(geometry, num_tokens, placement)
    if need.gpu_blocks > capacity.gpu_blocks:
        return (f"needs {need.gpu_blocks} GPU blocks for {num_tokens} tokens under placement {placement}, "
                f"the worker has {capacity.gpu_blocks}")
    if need.host_blocks > capacity.host_blocks:
        return (f"needs {need.host_blocks} host blocks for {num_tokens} tokens under placement {placement}, "
                f"the worker has {capacity.host_blocks}")
    staging = staging_needed(need.host_per_layer)
    if staging_blocks is not None and staging > staging_blocks:
        return (f"needs {staging} staging blocks for its host layers under placement {placement}, "
                f"the worker has {staging_blocks}")
    return None
