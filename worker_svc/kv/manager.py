"""Block accounting of both tiers: admission (check-then-mutate), release, promotion, usage.

Admission reserves, in every layer, blocks for prompt + max_tokens tokens in the tier the placement
names, so a running request never needs more and nothing is ever preempted. Host-placed layers
also need GPU staging blocks while they are computed: decode streams layer ``l+1`` in while layer
``l`` computes, so admission keeps the staging demand of any two adjacent layers within the staging
pool. Blocks whose copy is still in flight are freed only when it completes (``poll``).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.types import KVGeometry, Placement, Residency, Tier
from worker_svc.kv.block_pool import BlockPool
from worker_svc.kv.block_table import LayerBlocks, LayerBlockTable
from worker_svc.kv.offload import CopyEngine, CopyHandle, StagingPool
from worker_svc.outputs import KVUsage, TierUsage


@dataclass
class _DeferredFree:
    handle: CopyHandle
    tier: Tier
    ids: list[int]
    layer: int


class KVCacheManager:
    def __init__(self, geometry: KVGeometry, gpu_blocks: int, host_blocks: int, staging_blocks: int) -> None:
        self.geometry = geometry
        self.num_layers = geometry.num_layers
        self.gpu = BlockPool(gpu_blocks)
        self.host = BlockPool(host_blocks)
        self.staging = StagingPool(staging_blocks, first_id=gpu_blocks)
        self.tables: dict[str, LayerBlockTable] = {}
        self._used = {Tier.GPU: [0] * self.num_layers, Tier.HOST: [0] * self.num_layers}
        self._deferred: list[_DeferredFree] = []

    # ---- admission -------------------------------------------------------------------------
    def _staging_demand(self) -> list[int]:
        """Staging blocks each layer may need: host-home layers that are not being promoted.

        Derived from the tables on every check rather than tracked, so that finishing a request
        while one of its layers is being promoted cannot count the same blocks twice.
        """
        demand = [0] * self.num_layers
        for table in self.tables.values():
            for layer, lb in enumerate(table.layers):
                if lb.home is Tier.HOST and lb.residency is not Residency.LOADING:
                    demand[layer] += table.blocks_per_layer
        return demand

    def staging_fits(self, blocks_per_layer: int, placement: Placement) -> bool:
        demand = self._staging_demand()
        for layer, tier in enumerate(placement.tiers):
            if tier is Tier.HOST:
                demand[layer] += blocks_per_layer
        if self.num_layers == 1:
            return demand[0] <= self.staging.num_blocks
        pairs = (demand[i] + demand[i + 1] for i in range(self.num_layers - 1))
        return max(pairs) <= self.staging.num_blocks

    def can_allocate(self, num_tokens: int, placement: Placement) -> bool:
        gpu, host = self.geometry.blocks_needed(num_tokens, placement)
        per_layer = self.geometry.blocks_for(num_tokens)
        return (self.gpu.can_allocate(gpu) and self.host.can_allocate(host)
                and self.staging_fits(per_layer, placement))

    def could_ever_fit(self, num_tokens: int, placement: Placement) -> str | None:
        """Why the request cannot be admitted even into empty tiers, or ``None``."""
        gpu, host = self.geometry.blocks_needed(num_tokens, placement)
        per_layer = self.geometry.blocks_for(num_tokens)
        if gpu > self.gpu.num_blocks:
            return (f"needs {gpu} GPU blocks under placement {placement}, "
                    f"the worker has {self.gpu.num_blocks}")
        if host > self.host.num_blocks:
            return (f"needs {host} host blocks under placement {placement}, "
                    f"the worker has {self.host.num_blocks}")
        adjacent = 2 if self.num_layers > 1 and "HH" in placement.letters else 1
        if placement.host_layers and adjacent * per_layer > self.staging.num_blocks:
            return (f"needs {adjacent * per_layer} staging blocks for its host layers, "
                    f"the worker has {self.staging.num_blocks}")
        return None

    def allocate(self, request_id: str, num_tokens: int, placement: Placement) -> LayerBlockTable | None:
        """Reserve every layer's blocks, or return ``None`` and take nothing."""
        assert request_id not in self.tables, f"request {request_id} already holds blocks"
        if not self.can_allocate(num_tokens, placement):
            return None
        per_layer = self.geometry.blocks_for(num_tokens)
        layers = []
        for layer, tier in enumerate(placement.tiers):
            if tier is Tier.GPU:
                ids = self.gpu.allocate(per_layer)
                assert ids is not None
                layers.append(LayerBlocks(Tier.GPU, Residency.GPU, gpu_blocks=ids))
            else:
                ids = self.host.allocate(per_layer)
                assert ids is not None
                layers.append(LayerBlocks(Tier.HOST, Residency.HOST, host_blocks=ids))
            self._used[tier][layer] += per_layer
        table = LayerBlockTable(request_id, num_tokens, per_layer, layers)
        self.tables[request_id] = table
        return table

    # ---- release ---------------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Return all blocks of a finished or aborted request (later, for blocks a copy still uses)."""
        table = self.tables.pop(request_id)
        for layer, lb in enumerate(table.layers):
            pending = lb.pending if lb.pending is not None and not lb.pending.done() else None
            for tier, ids in ((Tier.GPU, lb.gpu_blocks), (Tier.HOST, lb.host_blocks)):
                if not ids:
                    continue
                if pending is not None:
                    self._deferred.append(_DeferredFree(pending, tier, ids, layer))
                else:
                    self._free(tier, ids, layer)

    def _free(self, tier: Tier, ids: list[int], layer: int) -> None:
        (self.gpu if tier is Tier.GPU else self.host).free(ids)
        self._used[tier][layer] -= len(ids)

    # ---- promotion -------------------------------------------------------------------------
    def promotable(self) -> list[tuple[LayerBlockTable, int]]:
        """Host layers with no copy in flight, oldest request first (tables keep admission order)."""
        return [(t, layer) for t in self.tables.values() for layer, lb in enumerate(t.layers)
                if lb.home is Tier.HOST and lb.residency is Residency.HOST]

    def start_promotion(self, table: LayerBlockTable, layer: int, copy: CopyEngine,
                        gpu_tensor: object, host_tensor: object) -> int:
        """Reserve GPU blocks for a host layer and start loading it; bytes copied, or -1 if no room."""
        lb = table.layers[layer]
        ids = self.gpu.allocate(table.blocks_per_layer)
        if ids is None:
            return -1
        self._used[Tier.GPU][layer] += len(ids)
        filled = self.geometry.blocks_for(table.num_tokens)
        lb.gpu_blocks = ids
        lb.residency = Residency.LOADING
        lb.pending = copy.copy_blocks(host_tensor, lb.host_blocks[:filled], gpu_tensor,  # type: ignore[arg-type]
                                      ids[:filled])
        return filled * self.geometry.bytes_per_block

    # ---- copy completion -------------------------------------------------------------------
    def poll(self) -> None:
        """Finish transient residencies and deferred frees whose copies are done."""
        for table in self.tables.values():
            for layer, lb in enumerate(table.layers):
                if lb.pending is None or not lb.pending.done():
                    continue
                lb.pending = None
                if lb.residency is Residency.STORING:
                    lb.residency = Residency.HOST
                elif lb.residency is Residency.LOADING:  # promotion done: the host copy is stale now
                    self._free(Tier.HOST, lb.host_blocks, layer)
                    lb.host_blocks = []
                    lb.home, lb.residency = Tier.GPU, Residency.GPU
        still = []
        for d in self._deferred:
            if d.handle.done():
                self._free(d.tier, d.ids, d.layer)
            else:
                still.append(d)
        self._deferred = still
        self.staging.reclaim()

    @property
    def copies_in_flight(self) -> bool:
        self.poll()
        return bool(self._deferred) or not self.staging.idle or any(
            lb.pending is not None for t in self.tables.values() for lb in t.layers)

    def usage(self) -> KVUsage:
        return KVUsage(
            gpu=TierUsage(self.gpu.num_blocks, self.gpu.num_free, tuple(self._used[Tier.GPU])),
            host=TierUsage(self.host.num_blocks, self.host.num_free, tuple(self._used[Tier.HOST])),
        )
