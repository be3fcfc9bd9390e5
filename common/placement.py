"""The paper's placement rule: how many layers stay on the GPU, and which ones.

Offloading a layer's KV costs a device-to-host copy; it is free only if it hides under the prefill
compute. So the number of offloaded layers is the largest whose copies fit in the predicted prefill
time, and the resident layers are spread evenly through the depth so that every copy overlaps a
resident neighbour's compute (arXiv 2410.00428 §3; see docs/design.md).
"""

from __future__ import annotations

import math

from common.types import CostModel, KVGeometry, Placement, Tier


def min_resident_layers(num_tokens: int, geometry: KVGeometry, cost: CostModel) -> int:
    """Fewest resident layers such that copying the others to the host takes no longer than prefill.

    ``num_tokens`` is the whole prefill batch: its requests share one copy link and one prefill.
    """
    layers = geometry.num_layers
    bytes_per_layer = geometry.bytes_per_layer(num_tokens)
    if bytes_per_layer <= 0 or cost.host_in_place:
        return 0  # nothing to hide: host layers read in place move no bytes
    copy_budget_bytes = cost.prefill_s(num_tokens) * cost.d2h_bytes_per_s
    offloadable = min(layers, math.floor(copy_budget_bytes / bytes_per_layer))
    return layers - offloadable


def interleaved(num_layers: int, resident: int) -> Placement:
    """``resident`` GPU layers spread evenly through the depth, never a contiguous run of them.

    With 8 layers and 4 resident this gives layers 1, 3, 5, 7 on the GPU (the paper's example):
    resident layer ``i`` sits at the end of the ``i``-th of ``resident`` equal segments.
    """
    if not 0 <= resident <= num_layers:
        raise ValueError(f"resident layers must be in [0, {num_layers}], got {resident}")
    gpu = {((i + 1) * num_layers) // resident - 1 for i in range(resident)} if resident else set()
    return Placement(tuple(Tier.GPU if layer in gpu else Tier.HOST for layer in range(num_layers)))


def rule_placement(num_tokens: int, geometry: KVGeometry, cost: CostModel) -> Placement:
    """The paper's placement for a prefill batch of ``num_tokens`` tokens."""
    return interleaved(geometry.num_layers, min_resident_layers(num_tokens, geometry, cost))
