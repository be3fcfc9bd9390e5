"""The layer block table of one request: for each layer, its block ids in each tier and its residency.

A layer's home tier is where its reserved blocks live (GPU or host). The transient residencies say a
copy is in flight: STORING (prefill KV on its way from GPU staging blocks to host blocks) and LOADING
(a promotion: host KV on its way into freshly reserved GPU blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.types import Residency, Tier
from worker_svc.kv.offload import CopyHandle


@dataclass
class LayerBlocks:
    """One layer of one request."""

    home: Tier  # tier whose blocks hold this layer for the request's lifetime (changes on promotion)
    residency: Residency
    gpu_blocks: list[int] = field(default_factory=list)  # GPU-tier ids (home GPU, or promotion target)
    host_blocks: list[int] = field(default_factory=list)  # host-tier ids (home HOST)
    pending: CopyHandle | None = None  # the copy that ends the transient residency


@dataclass
class LayerBlockTable:
    """Per-layer blocks of one request; every layer reserves ``blocks_per_layer`` blocks."""

    request_id: str
    reserved_tokens: int  # prompt + max_tokens: admission reserves them all, so no preemption
    blocks_per_layer: int
    layers: list[LayerBlocks]
    num_tokens: int = 0  # slots already holding K/V

    @property
    def letters(self) -> str:
        """Current placement: G for a layer attention reads in GPU blocks without a copy, else H."""
        return "".join("G" if lb.residency is Residency.GPU else "H" for lb in self.layers)

    def host_layers(self) -> list[int]:
        return [i for i, lb in enumerate(self.layers) if lb.home is Tier.HOST]

    def copies_in_flight(self) -> list[CopyHandle]:
        return [lb.pending for lb in self.layers if lb.pending is not None and not lb.pending.done()]
