"""The layer block table of one request: for each layer, its block ids in each tier and its residency.

A layer's home tier is where its blocks live (GPU or host). Every layer holds the same number of
blocks, enough for the tokens cached so far; decode adds one block per layer each time the request
crosses a block boundary. The transient residencies say a copy is in flight: STORING (KV on its
way from GPU staging blocks to host blocks) and LOADING (a promotion: host KV on its way into
freshly taken GPU blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.types import Residency, Tier
from worker_svc.kv.offload import CopyHandle


@dataclass
class LayerBlocks:
    """One layer of one request."""

    home: Tier  # tier whose blocks hold this layer (changes on promotion and on a swap-out)
    residency: Residency
    gpu_blocks: list[int] = field(default_factory=list)  # GPU-tier ids (home GPU, or promotion target)
    host_blocks: list[int] = field(default_factory=list)  # host-tier ids (home HOST)
    pending: CopyHandle | None = None  # the copy that ends the transient residency

    @property
    def reads_gpu_blocks(self) -> bool:
        """Attention reads this layer from its own GPU blocks (GPU home, or a promotion in flight)."""
        return self.home is Tier.GPU or self.residency is Residency.LOADING


@dataclass
class LayerBlockTable:
    """Per-layer blocks of one request; every layer holds ``blocks_per_layer`` blocks."""

    request_id: str
    blocks_per_layer: int  # grows on demand as the request's context crosses block boundaries
    layers: list[LayerBlocks]
    num_tokens: int = 0  # slots already holding K/V
    version: int = 0  # bumped whenever a layer's blocks or residency change other than by growth
    store: CopyHandle | None = None  # the latest write-back of any host layer (copies run in order)

    _letters: tuple[int, str] = (-1, "")  # (version, letters): residency changes bump the version

    @property
    def letters(self) -> str:
        """Current placement: G for a layer attention reads in GPU blocks without a copy, else H."""
        if self._letters[0] != self.version:
            self._letters = (self.version, "".join("G" if lb.residency is Residency.GPU else "H"
                                                   for lb in self.layers))
        return self._letters[1]

    _reads: tuple[int, tuple[bool, ...]] = (-1, ())

    @property
    def reads_gpu(self) -> tuple[bool, ...]:
        """``reads_gpu_blocks`` of every layer (residency changes bump the version)."""
        if self._reads[0] != self.version:
            self._reads = (self.version, tuple(lb.reads_gpu_blocks for lb in self.layers))
        return self._reads[1]

    _split: tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]] = (
        -1, (), (), (), ())

    @property
    def read_split(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(GPU-read layers, host-read layers, 1 per GPU-read layer else 0, 1 per host-read layer
        else 0) from ``reads_gpu``: what a one-block growth takes and counts per layer, kept per
        version like it rather than rebuilt by every growth of every step."""
        if self._split[0] != self.version:
            reads = self.reads_gpu
            self._split = (self.version, tuple(i for i, r in enumerate(reads) if r),
                           tuple(i for i, r in enumerate(reads) if not r), tuple(int(r) for r in reads),
                           tuple(int(not r) for r in reads))
        return self._split[1:]  # type: ignore[return-value]

    def host_layers(self) -> list[int]:
        return [i for i, lb in enumerate(self.layers) if lb.home is Tier.HOST]

    def copies_in_flight(self) -> list[CopyHandle]:
        pending = [lb.pending for lb in self.layers if lb.pending is not None and not lb.pending.done()]
        return [*pending, self.store] if self.store is not None and not self.store.done() else pending
