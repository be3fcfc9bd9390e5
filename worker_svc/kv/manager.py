"""Block accounting of both tiers: admission and growth (check-then-mutate), swap-out, release,
promotion, usage.

Admission takes, in every layer, blocks for the tokens to prefill (the prompt, or prompt + output
after a recompute preemption) in the tier the placement names; decode grows each layer by one
block whenever the request crosses a block boundary. Host-placed layers also need GPU staging
blocks while they are computed: a step streams layer ``l+1`` in while layer ``l`` computes, so
admission and growth keep the staging demand of any two adjacent layers within the staging pool.
Every count goes through ``common.kv_budget``, the arithmetic the scheduler uses too. Blocks whose
copy is still in flight are freed only when it completes (``poll``). With ``host_in_place`` (host
layers read in place on the CPU, ``kv_cache``) there is no staging rule and nothing to promote.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import add, sub

from common import kv_budget
from common.kv_budget import BlockDemand
from common.types import KVGeometry, Placement, Residency, Tier, TierCapacity
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


class _Both:
    """Done when both copies are."""

    def __init__(self, a: CopyHandle, b: CopyHandle) -> None:
        self.a, self.b = a, b

    def done(self) -> bool:
        return self.a.done() and self.b.done()

    def wait(self) -> None:
        self.a.wait()
        self.b.wait()

    def order_compute_after(self) -> None:
        self.a.order_compute_after()
        self.b.order_compute_after()


class KVCacheManager:
    def __init__(self, geometry: KVGeometry, gpu_blocks: int, host_blocks: int, staging_blocks: int,
                 host_in_place: bool = False) -> None:
        self.geometry = geometry
        self.host_in_place = host_in_place
        # The staging rule's bound: None when host layers are read in place (there is no rule).
        self.staging_limit: int | None = None if host_in_place else staging_blocks
        self.num_layers = geometry.num_layers
        self.gpu = BlockPool(gpu_blocks)
        self.host = BlockPool(host_blocks)
        self.staging = StagingPool(staging_blocks, first_id=gpu_blocks)
        self.tables: dict[str, LayerBlockTable] = {}
        self._used = {Tier.GPU: [0] * self.num_layers, Tier.HOST: [0] * self.num_layers}
        self._deferred: list[_DeferredFree] = []
        # Host-read blocks per layer (what may need staging), kept up to date by every change below
        # rather than derived from all tables on each check (growth checks it once per request).
        self._host_read = [0] * self.num_layers
        self._pending: dict[tuple[int, int], LayerBlockTable] = {}  # (id(table), layer) with a copy set

    # ---- checks ----------------------------------------------------------------------------
    def _staging_demand(self) -> list[int]:
        """Host-placed blocks per layer that may need staging: host-home layers not being promoted.

        Tracked: a layer counts while it does not read GPU blocks, so finishing a request while one
        of its layers is being promoted (already uncounted) cannot count the same blocks twice."""
        return list(self._host_read)

    def derived_staging_demand(self) -> list[int]:
        """``_staging_demand`` recomputed from every table (what the tracked counts must equal)."""
        demand = [0] * self.num_layers
        for table in self.tables.values():
            for layer, lb in enumerate(table.layers):
                if not lb.reads_gpu_blocks:
                    demand[layer] += table.blocks_per_layer
        return demand

    def fits(self, need: BlockDemand) -> bool:
        """Whether ``need`` more blocks fit the free blocks of both tiers and the staging rule."""
        host_per_layer = [a + b for a, b in zip(self._staging_demand(), need.host_per_layer, strict=True)]
        return (self.gpu.can_allocate(need.gpu_blocks) and self.host.can_allocate(need.host_blocks)
                and self._staging_holds(kv_budget.staging_needed(host_per_layer)))

    def can_allocate(self, num_tokens: int, placement: Placement) -> bool:
        return self.fits(kv_budget.demand(self.geometry, num_tokens, placement))

    def _staging_holds(self, needed: int) -> bool:
        """Whether ``needed`` staging blocks (``kv_budget.staging_needed``) are within the rule's bound."""
        return self.staging_limit is None or needed <= self.staging_limit

    def could_ever_fit(self, num_tokens: int, placement: Placement) -> str | None:
        """Why ``num_tokens`` tokens under ``placement`` cannot be held even by empty tiers, or ``None``."""
        capacity = TierCapacity(self.gpu.num_blocks, self.host.num_blocks)
        return kv_budget.never_fits(self.geometry, num_tokens, placement, capacity, self.staging_limit)

    # ---- admission and growth -----------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, placement: Placement) -> LayerBlockTable | None:
        """Take every layer's blocks for ``num_tokens`` tokens, or return ``None`` and take nothing."""
        assert request_id not in self.tables, f"request {request_id} already holds blocks"
        if not self.can_allocate(num_tokens, placement):
            return None
        per_layer = kv_budget.blocks_per_layer(self.geometry, num_tokens)
        layers = []
        for layer, tier in enumerate(placement.tiers):
            ids = self._take(tier, per_layer, layer)
            if tier is Tier.GPU:
                layers.append(LayerBlocks(Tier.GPU, Residency.GPU, gpu_blocks=ids))
            else:
                layers.append(LayerBlocks(Tier.HOST, Residency.HOST, host_blocks=ids))
                self._host_read[layer] += per_layer
        table = LayerBlockTable(request_id, per_layer, layers)
        self.tables[request_id] = table
        return table

    def growth_demand(self, table: LayerBlockTable, to_tokens: int) -> BlockDemand:
        """More blocks per layer and tier ``table`` needs to hold ``to_tokens`` tokens."""
        held_tokens = table.blocks_per_layer * self.geometry.block_size
        g = kv_budget.growth_per_layer(self.geometry, held_tokens, to_tokens)
        reads = table.reads_gpu
        return BlockDemand(tuple(g if r else 0 for r in reads), tuple(0 if r else g for r in reads))

    def growth_shortfall(self, table: LayerBlockTable, to_tokens: int) -> Tier | str | None:
        """What stops ``table`` growing to ``to_tokens``: a tier, "staging", or ``None`` (it fits)."""
        need = self.growth_demand(table, to_tokens)
        if not self.gpu.can_allocate(need.gpu_blocks):
            return Tier.GPU
        if not self.host.can_allocate(need.host_blocks):
            return Tier.HOST
        return None if self.fits(need) else "staging"

    def grow(self, table: LayerBlockTable, to_tokens: int) -> bool:
        """Add blocks so every layer holds ``to_tokens`` tokens; ``False`` (nothing taken) if no room."""
        if to_tokens <= table.blocks_per_layer * self.geometry.block_size:
            return True  # most decode steps: the last block has room
        if to_tokens <= (table.blocks_per_layer + 1) * self.geometry.block_size:
            return self._grow_one(table)
        return self._grow_by(table, self.growth_demand(table, to_tokens))

    def _grow_by(self, table: LayerBlockTable, need: BlockDemand) -> bool:
        """``grow`` by the blocks ``need`` (of ``growth_demand``): the general path."""
        if need.gpu_blocks == need.host_blocks == 0:
            return True
        if not self.fits(need):
            return False
        # One pool call per tier for all layers (a decode's growth is a block per layer, and a call
        # per block cost more than the rest of the growth); layer by layer in ascending ids as before.
        gpu_ids = self.gpu.allocate(need.gpu_blocks)
        host_ids = self.host.allocate(need.host_blocks)
        assert gpu_ids is not None and host_ids is not None, "a pool has fewer free blocks after the check"
        used_gpu, used_host = self._used[Tier.GPU], self._used[Tier.HOST]
        g_at = h_at = 0
        for layer, (lb, g, h) in enumerate(zip(table.layers, need.gpu_per_layer, need.host_per_layer,
                                               strict=True)):
            if g:  # a GPU-read layer (a layer being promoted grows its GPU target only)
                lb.gpu_blocks += gpu_ids[g_at:g_at + g]
                g_at += g
                used_gpu[layer] += g
            if h:
                lb.host_blocks += host_ids[h_at:h_at + h]
                h_at += h
                used_host[layer] += h
                self._host_read[layer] += h
        table.blocks_per_layer += max(need.gpu_per_layer + need.host_per_layer)
        return True

    def _grow_one(self, table: LayerBlockTable) -> bool:
        """``grow`` by one block per layer (a decode crossing a block boundary: most growth), with
        the same checks, ids and counts as the general path but no per-layer demand tuples: the
        table's layer split is kept per version, and the per-layer counts move by its 0/1 masks in
        one ``map`` each (a batch-256 step grows 16 requests x 32 layers)."""
        gpu_at, host_at, gpu_mask, host_mask = table.read_split
        if not self.gpu.can_allocate(len(gpu_at)) or not self.host.can_allocate(len(host_at)):
            return False
        host_read = self._host_read
        after = list(map(add, host_read, host_mask)) if host_at else host_read  # [L] with the growth
        if host_at and self.staging_limit is not None and not self._staging_holds(
                kv_budget.staging_needed(after)):  # (no host layer: the staging demand is unchanged)
            return False
        gpu_ids = self.gpu.allocate(len(gpu_at))
        assert gpu_ids is not None, "the GPU pool has fewer free blocks after the check"
        layers, used_gpu = table.layers, self._used[Tier.GPU]
        if not host_at:  # every layer reads GPU blocks: one id each, in layer order
            for lb, block in zip(layers, gpu_ids, strict=True):
                lb.gpu_blocks.append(block)
            used_gpu[:] = [u + 1 for u in used_gpu]
        else:  # (a layer being promoted reads, and grows, its GPU target)
            host_ids = self.host.allocate(len(host_at))
            assert host_ids is not None, "the host pool has fewer free blocks after the check"
            for i, block in zip(gpu_at, gpu_ids, strict=True):
                layers[i].gpu_blocks.append(block)
            for i, block in zip(host_at, host_ids, strict=True):
                layers[i].host_blocks.append(block)
            used_gpu[:] = list(map(add, used_gpu, gpu_mask))
            used_host = self._used[Tier.HOST]
            used_host[:] = list(map(add, used_host, host_mask))
            host_read[:] = after
        table.blocks_per_layer += 1
        return True

    def grow_each_by_one(self, tables: list[LayerBlockTable]) -> bool:
        """``grow`` each of ``tables`` by one block per layer, in order, when all of them fit at
        once: the ids, counts and checks of ``_grow_one`` for each in turn (pools hand out ids from
        the top of their stack, so one call for all gives each table what its own call would; and
        every check only tightens as blocks are taken, so the last one passing passes them all), with
        one pool call per tier and one pass over the per-layer counts. ``False``, and nothing taken,
        when they do not all fit: the caller grows them one by one (and preempts where needed)."""
        splits = [t.read_split for t in tables]
        n_gpu = sum(len(split[0]) for split in splits)
        n_host = sum(len(split[1]) for split in splits)
        if not self.gpu.can_allocate(n_gpu) or not self.host.can_allocate(n_host):
            return False
        host_read = self._host_read
        after = host_read
        if n_host:
            for split in splits:
                if split[1]:
                    after = list(map(add, after, split[3]))
            if self.staging_limit is not None and not self._staging_holds(kv_budget.staging_needed(after)):
                return False
        gpu_ids = self.gpu.allocate(n_gpu)
        host_ids = self.host.allocate(n_host)
        assert gpu_ids is not None and host_ids is not None, "a pool has fewer free blocks after the check"
        used_gpu = self._used[Tier.GPU]
        added_gpu = [0] * self.num_layers
        g = h = 0
        for table, (gpu_at, host_at, gpu_mask, _) in zip(tables, splits, strict=True):
            layers = table.layers
            if not host_at:  # every layer reads GPU blocks: one id each, in layer order
                for lb, block in zip(layers, gpu_ids[g:g + len(layers)], strict=True):
                    lb.gpu_blocks.append(block)
            else:
                for i, block in zip(gpu_at, gpu_ids[g:g + len(gpu_at)], strict=True):
                    layers[i].gpu_blocks.append(block)
                for i, block in zip(host_at, host_ids[h:h + len(host_at)], strict=True):
                    layers[i].host_blocks.append(block)
                h += len(host_at)
            g += len(gpu_at)
            added_gpu = list(map(add, added_gpu, gpu_mask))
            table.blocks_per_layer += 1
        used_gpu[:] = list(map(add, used_gpu, added_gpu))
        if n_host:
            used_host = self._used[Tier.HOST]
            used_host[:] = list(map(add, used_host, map(sub, after, host_read)))
            host_read[:] = after
        return True

    def _take(self, tier: Tier, n: int, layer: int) -> list[int]:
        ids = (self.gpu if tier is Tier.GPU else self.host).allocate(n)
        assert ids is not None, f"{tier.value} pool has fewer than {n} free blocks after the check"
        self._used[tier][layer] += n
        return ids

    # ---- swap-out (swap-layers preemption) ----------------------------------------------------
    def swap_candidates(self, table: LayerBlockTable) -> list[int]:
        """GPU-resident layers of ``table`` that could move to the host tier now, best first.

        A layer qualifies when the host tier has its blocks and the staging rule still holds with
        it host-placed; those adding the least to the busiest adjacent pair come first.
        """
        n = table.blocks_per_layer
        if not self.host.can_allocate(n):
            return []
        base = self._staging_demand()
        scored = []
        for layer, lb in enumerate(table.layers):
            if lb.home is not Tier.GPU or lb.residency is not Residency.GPU:
                continue
            after = list(base)
            after[layer] += n
            need = kv_budget.staging_needed(after)
            if self._staging_holds(need):
                scored.append((need, layer))
        return [layer for _, layer in sorted(scored)]

    def swap_out(self, table: LayerBlockTable, layer: int, copy: CopyEngine,
                 gpu_tensor: object, host_tensor: object) -> int:
        """Move one GPU-home layer to host blocks; bytes copied. Waits for the copy so its GPU
        blocks are free on return (a swap is rare, and the growth that asked for it needs them now)."""
        lb = table.layers[layer]
        assert lb.home is Tier.GPU and lb.residency is Residency.GPU, f"layer {layer} is not GPU-resident"
        ids = self._take(Tier.HOST, len(lb.gpu_blocks), layer)
        filled = self.geometry.blocks_for(table.num_tokens)
        copy.copy_blocks(gpu_tensor, lb.gpu_blocks[:filled], host_tensor, ids[:filled]).wait()  # type: ignore[arg-type]
        self._free(Tier.GPU, lb.gpu_blocks, layer)
        lb.gpu_blocks, lb.host_blocks = [], ids
        lb.home, lb.residency = Tier.HOST, Residency.HOST
        self._host_read[layer] += table.blocks_per_layer
        table.version += 1
        return filled * self.geometry.bytes_per_block

    # ---- release ---------------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Return all blocks of a finished, aborted or preempted request (later, for blocks a copy
        still uses)."""
        table = self.tables.pop(request_id)
        store = table.store if table.store is not None and not table.store.done() else None
        for layer, lb in enumerate(table.layers):
            if not lb.reads_gpu_blocks:
                self._host_read[layer] -= table.blocks_per_layer
            pending = lb.pending if lb.pending is not None and not lb.pending.done() else None
            for tier, ids in ((Tier.GPU, lb.gpu_blocks), (Tier.HOST, lb.host_blocks)):
                if not ids:
                    continue
                if tier is Tier.HOST and store is not None:  # a step's write-back still fills them
                    self._deferred.append(_DeferredFree(store if pending is None else _Both(pending, store),
                                                        tier, ids, layer))
                elif pending is not None:
                    self._deferred.append(_DeferredFree(pending, tier, ids, layer))
                else:
                    self._free(tier, ids, layer)

    def _free(self, tier: Tier, ids: list[int], layer: int) -> None:
        (self.gpu if tier is Tier.GPU else self.host).free(ids)
        self._used[tier][layer] -= len(ids)

    # ---- promotion -------------------------------------------------------------------------
    @property
    def has_host_reads(self) -> bool:
        """Some layer of some request is read through staging (the only kind a promotion can move)."""
        return not self.host_in_place and any(self._host_read)

    def promotable(self, request_ids: set[str] | None = None) -> list[tuple[LayerBlockTable, int]]:
        """Host layers (of ``request_ids``, or all) with no copy in flight, oldest request first."""
        if not self.has_host_reads:
            return []
        return [(t, layer) for t in self.tables.values() for layer, lb in enumerate(t.layers)
                if lb.home is Tier.HOST and lb.residency is Residency.HOST
                and (request_ids is None or t.request_id in request_ids)]

    def start_promotion(self, table: LayerBlockTable, layer: int, copy: CopyEngine,
                        gpu_tensor: object, host_tensor: object, keep_free: int = 0) -> int:
        """Take GPU blocks for a host layer and start loading it; bytes copied, or -1 when that
        would leave fewer than ``keep_free`` GPU blocks free."""
        lb = table.layers[layer]
        if self.gpu.num_free - table.blocks_per_layer < keep_free:
            return -1
        ids = self._take(Tier.GPU, table.blocks_per_layer, layer)
        filled = self.geometry.blocks_for(table.num_tokens)
        lb.gpu_blocks = ids
        lb.residency = Residency.LOADING
        self._host_read[layer] -= table.blocks_per_layer
        table.version += 1
        load = copy.copy_blocks(host_tensor, lb.host_blocks[:filled], gpu_tensor, ids[:filled])  # type: ignore[arg-type]
        self.set_pending(table, layer, load)
        return filled * self.geometry.bytes_per_block

    # ---- copy completion -------------------------------------------------------------------
    def set_pending(self, table: LayerBlockTable, layer: int, handle: CopyHandle) -> None:
        """``handle`` ends a copy of ``table``'s layer; ``poll`` settles it (only layers set here)."""
        table.layers[layer].pending = handle
        self._pending[(id(table), layer)] = table

    def set_store(self, table: LayerBlockTable, handle: CopyHandle) -> None:
        """``handle`` ends the latest write-back to ``table``'s host blocks (``release`` waits for it)."""
        table.store = handle

    def loading(self) -> list[tuple[LayerBlockTable, int]]:
        """(table, layer) of the promotions still in flight."""
        return [(t, layer) for (_, layer), t in self._pending.items()
                if t.layers[layer].residency is Residency.LOADING]

    def poll(self) -> None:
        """Finish transient residencies and deferred frees whose copies are done."""
        for key, table in list(self._pending.items()):
            layer = key[1]
            lb = table.layers[layer]
            if lb.pending is not None and not lb.pending.done():
                continue
            del self._pending[key]
            lb.pending = None  # a finished request's table is settled too, harmlessly
            if lb.residency is Residency.STORING:
                lb.residency = Residency.HOST
                table.version += 1
            elif lb.residency is Residency.LOADING and self.tables.get(table.request_id) is table:
                # promotion done: the host copy is stale now
                self._free(Tier.HOST, lb.host_blocks, layer)
                lb.host_blocks = []
                lb.home, lb.residency = Tier.GPU, Residency.GPU
                table.version += 1
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
            self.tables.get(t.request_id) is t for t in self._pending.values())

    def usage(self) -> KVUsage:
        return KVUsage(
            gpu=TierUsage(self.gpu.num_blocks, self.gpu.num_free, tuple(self._used[Tier.GPU])),
            host=TierUsage(self.host.num_blocks, self.host.num_free, tuple(self._used[Tier.HOST])),
        )
