"""The shared block arithmetic: demand per tier and layer, growth, the staging rule, never-fits."""

from __future__ import annotations

import pytest

from common.kv_budget import (
    BlockDemand,
    demand,
    growth,
    growth_per_layer,
    headroom,
    never_fits,
    staging_fits,
    staging_needed,
)
from common.types import KVGeometry, Placement, TierCapacity

GEOMETRY = KVGeometry(num_layers=4, num_kv_heads=2, head_dim=8, block_size=16, dtype_bytes=4)


@pytest.mark.parametrize(
    ("tokens", "letters", "gpu", "host"),
    [
        (0, "GGGG", (0, 0, 0, 0), (0, 0, 0, 0)),
        (1, "GGGG", (1, 1, 1, 1), (0, 0, 0, 0)),
        (16, "GHGH", (1, 0, 1, 0), (0, 1, 0, 1)),
        (17, "HHHH", (0, 0, 0, 0), (2, 2, 2, 2)),
        (33, "GGHH", (3, 3, 0, 0), (0, 0, 3, 3)),
    ],
)
def test_demand_counts_each_layer_in_its_tier(tokens, letters, gpu, host):
    need = demand(GEOMETRY, tokens, Placement.from_letters(letters, 4))
    assert need == BlockDemand(gpu, host)
    assert need.gpu_blocks == sum(gpu) and need.host_blocks == sum(host)


def test_demands_add_per_layer():
    a = demand(GEOMETRY, 16, Placement.from_letters("GHGH", 4))
    b = demand(GEOMETRY, 40, Placement.from_letters("HHGG", 4))
    assert a + b == BlockDemand((1, 0, 4, 3), (3, 4, 0, 1))
    assert BlockDemand.zero(4) + a == a


@pytest.mark.parametrize(
    ("start", "end", "grow"), [(16, 16, 0), (16, 17, 1), (15, 16, 0), (1, 48, 2), (20, 10, 0)]
)
def test_growth_counts_block_boundaries_crossed(start, end, grow):
    assert growth_per_layer(GEOMETRY, start, end) == grow


@pytest.mark.parametrize(
    ("host", "needed"),
    [((), 0), ((5,), 5), ((1, 0, 1, 0), 1), ((2, 3, 0, 4), 5), ((0, 0, 0, 0), 0)],
)
def test_staging_needs_the_largest_adjacent_pair(host, needed):
    assert staging_needed(host) == needed
    assert staging_fits(host, needed)
    assert needed == 0 or not staging_fits(host, needed - 1)


def test_never_fits_names_the_limit_that_binds():
    capacity = TierCapacity(gpu_blocks=8, host_blocks=8)
    assert never_fits(GEOMETRY, 32, Placement.from_letters("GGGG", 4), capacity, 4) is None
    gpu = never_fits(GEOMETRY, 48, Placement.from_letters("GGGG", 4), capacity, 4)
    assert gpu is not None and "12 GPU blocks" in gpu and "has 8" in gpu
    host = never_fits(GEOMETRY, 48, Placement.from_letters("HHHH", 4), capacity, 8)
    assert host is not None and "12 host blocks" in host
    staging = never_fits(GEOMETRY, 48, Placement.from_letters("GHHG", 4), TierCapacity(16, 16), 5)
    assert staging is not None and "6 staging blocks" in staging


@pytest.mark.parametrize(
    ("held", "headroom_tokens", "end", "letters", "gpu", "host"),
    [
        (16, 0, 100, "GGGG", (0, 0, 0, 0), (0, 0, 0, 0)),  # vLLM's rule: no headroom
        (16, 1, 100, "GHGH", (1, 0, 1, 0), (0, 1, 0, 1)),  # one more token crosses a boundary
        (17, 15, 100, "GGGG", (0, 0, 0, 0), (0, 0, 0, 0)),  # 32 tokens still fit 2 blocks
        (17, 16, 100, "GGHH", (1, 1, 0, 0), (0, 0, 1, 1)),
        (16, 1000, 40, "GGGG", (2, 2, 2, 2), (0, 0, 0, 0)),  # never past prompt + max_tokens
        (40, 1000, 40, "GGGG", (0, 0, 0, 0), (0, 0, 0, 0)),  # at its end: nothing left to grow
        (50, 8, 40, "HHHH", (0, 0, 0, 0), (0, 0, 0, 0)),  # past the end (a stale end): none
    ],
)
def test_headroom_is_growth_ahead_of_the_held_kv_up_to_the_end(
    held, headroom_tokens, end, letters, gpu, host
):
    placement = Placement.from_letters(letters, 4)
    got = headroom(GEOMETRY, held, headroom_tokens, end, placement)
    assert (got.gpu_per_layer, got.host_per_layer) == (gpu, host)
    assert got == growth(GEOMETRY, held, max(held, min(held + headroom_tokens, end)), placement)
