"""The model's view of the KV cache for one step (``LayerKVAccess``): per-layer metadata, staging,
and the copies around each layer.

Prefill: a GPU-home layer writes its K/V into its own blocks; a host-home layer writes into staging
blocks and, right after its attention, those are copied to its host blocks (STORING) while the next
layers compute. Decode: the host-home layers of layer ``l+1`` are streamed into staging blocks while
layer ``l`` computes; after attention the block holding the new token is written back to the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from common.types import Residency, Tier
from worker_svc.attention import AttentionMetadata
from worker_svc.kv.block_table import LayerBlockTable
from worker_svc.kv.kv_cache import KVCache
from worker_svc.kv.manager import KVCacheManager
from worker_svc.kv.offload import CopyEngine, CopyHandle


@dataclass
class CopyStats:
    bytes_offloaded: int = 0  # device-to-host
    bytes_loaded: int = 0  # host-to-device
    wait_s: float = 0.0  # host time spent waiting for copies before compute could go on
    offloaded_by_request: dict[str, int] = field(default_factory=dict)
    loaded_by_request: dict[str, int] = field(default_factory=dict)

    def offloaded(self, request_id: str, nbytes: int) -> None:
        self.bytes_offloaded += nbytes
        self.offloaded_by_request[request_id] = self.offloaded_by_request.get(request_id, 0) + nbytes

    def loaded(self, request_id: str, nbytes: int) -> None:
        self.bytes_loaded += nbytes
        self.loaded_by_request[request_id] = self.loaded_by_request.get(request_id, 0) + nbytes


@dataclass
class _StagedLayer:
    """Staging blocks lent to the host-home layers of one layer for this step."""

    ids: dict[str, list[int]] = field(default_factory=dict)  # request id -> staging block ids
    load: CopyHandle | None = None


class _StepAccess:
    def __init__(self, tables: list[LayerBlockTable], kv: KVCache, manager: KVCacheManager,
                 copy: CopyEngine, stats: CopyStats) -> None:
        self.tables = tables
        self.kv = kv
        self.manager = manager
        self.copy = copy
        self.stats = stats
        self.bs = kv.geometry.block_size
        self.device = kv.gpu.device
        self.block_bytes = kv.geometry.bytes_per_block

    def _wait(self, handle: CopyHandle) -> None:
        """Order compute after a copy; count host time only when it is not already done."""
        if not handle.done():
            start = time.perf_counter()
            handle.wait()
            self.stats.wait_s += time.perf_counter() - start
        handle.order_compute_after()

    def abandon(self) -> None:
        """Return the staging blocks this step still holds (the forward failed midway)."""

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)


class PrefillAccess(_StepAccess):
    """Prompts of ``tables`` (same order), each of ``prompt_lens[i]`` tokens starting at slot 0."""

    def __init__(self, tables: list[LayerBlockTable], prompt_lens: list[int], kv: KVCache,
                 manager: KVCacheManager, copy: CopyEngine, stats: CopyStats) -> None:
        super().__init__(tables, kv, manager, copy, stats)
        self.prompt_lens = prompt_lens
        cu = [0]
        for n in prompt_lens:
            cu.append(cu[-1] + n)
        self.cu_seqlens = torch.tensor(cu, dtype=torch.int32).to(self.device)
        pos = torch.cat([torch.arange(n) for n in prompt_lens])  # [T] slot of each token
        self.block_index = pos // self.bs  # [T] which of its request's blocks
        self.offsets = (pos % self.bs).to(self.device)
        self._staged: dict[str, list[int]] = {}
        # Slot blocks of every layer as if all were GPU-home, built once: [L, T] on the device.
        num_layers = len(tables[0].layers)
        per_request = []
        start = 0
        for table, n in zip(tables, prompt_lens, strict=True):
            nblocks = -(-n // self.bs)
            ids = torch.tensor([lb.gpu_blocks[:nblocks] if lb.home is Tier.GPU else [0] * nblocks
                                for lb in table.layers], dtype=torch.int64)  # [L, nblocks]
            per_request.append(ids[:, self.block_index[start:start + n]])  # [L, n]
            start += n
        self._gpu_slots = torch.cat(per_request, dim=1).to(self.device)  # [L, T]
        self._host_layers = [any(t.layers[i].home is Tier.HOST for t in tables) for i in range(num_layers)]

    def begin_layer(self, layer: int) -> tuple[torch.Tensor, AttentionMetadata]:
        self._staged = {}
        slot_blocks = self._gpu_slots[layer]
        if self._host_layers[layer]:  # host-home requests write into staging blocks instead
            blocks, start = [], 0
            for table, n in zip(self.tables, self.prompt_lens, strict=True):
                lb = table.layers[layer]
                nblocks = -(-n // self.bs)
                if lb.home is Tier.GPU:
                    ids = lb.gpu_blocks[:nblocks]
                else:
                    ids = self.manager.staging.allocate(nblocks)
                    self._staged[table.request_id] = ids
                blocks.append(torch.tensor(ids, dtype=torch.int64)[self.block_index[start:start + n]])
                start += n
            slot_blocks = torch.cat(blocks).to(self.device)
        meta = AttentionMetadata(is_prefill=True, slot_blocks=slot_blocks, slot_offsets=self.offsets,
                                 seq_lens=self.prompt_lens, cu_seqlens=self.cu_seqlens)
        return self.kv.gpu, meta

    def abandon(self) -> None:
        for ids in self._staged.values():
            self.manager.staging.release(ids)
        self._staged = {}

    def end_layer(self, layer: int) -> None:
        for table in self.tables:
            ids = self._staged.get(table.request_id)
            if ids is None:
                continue
            lb = table.layers[layer]
            handle = self.copy.copy_blocks(self.kv.gpu, ids, self.kv.host, lb.host_blocks[:len(ids)])
            lb.residency, lb.pending = Residency.STORING, handle
            self.manager.staging.release_after(ids, handle)
            self.stats.offloaded(table.request_id, len(ids) * self.block_bytes)
        self._staged = {}


class DecodeAccess(_StepAccess):
    """One new token per request at slot ``context_lens[i]`` (the tokens already cached)."""

    def __init__(self, tables: list[LayerBlockTable], context_lens: list[int], kv: KVCache,
                 manager: KVCacheManager, copy: CopyEngine, stats: CopyStats) -> None:
        super().__init__(tables, kv, manager, copy, stats)
        self.context_lens = context_lens
        self.attend_lens = torch.tensor([c + 1 for c in context_lens], dtype=torch.int32).to(self.device)
        self.max_blocks = max(-(-(c + 1) // self.bs) for c in context_lens)
        self.offsets = self._to_device([c % self.bs for c in context_lens])
        self._staged: dict[int, _StagedLayer] = {}
        self._tables_by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prebuild()

    def _prefetch(self, layer: int) -> None:
        """Stream layer ``layer``'s host-home KV into staging blocks (one copy call for all requests)."""
        staged = _StagedLayer()
        src: list[int] = []
        dst: list[int] = []
        for table, ctx in zip(self.tables, self.context_lens, strict=True):
            lb = table.layers[layer]
            if lb.home is not Tier.HOST or lb.residency is Residency.LOADING:
                continue
            ids = self.manager.staging.allocate(-(-(ctx + 1) // self.bs))
            staged.ids[table.request_id] = ids
            filled = -(-ctx // self.bs)
            src += lb.host_blocks[:filled]
            dst += ids[:filled]
            self.stats.loaded(table.request_id, filled * self.block_bytes)
        if src:
            staged.load = self.copy.copy_blocks(self.kv.host, src, self.kv.gpu, dst)
        self._staged[layer] = staged

    def begin_layer(self, layer: int) -> tuple[torch.Tensor, AttentionMetadata]:
        if layer == 0:
            self._prefetch(0)
        if layer + 1 < len(self.tables[0].layers):
            self._prefetch(layer + 1)  # overlaps this layer's compute
        staged = self._staged[layer]
        if staged.load is not None:
            self._wait(staged.load)
        for table in self.tables:
            lb = table.layers[layer]
            if lb.residency is Residency.LOADING:  # promotion in flight: wait, then use the GPU blocks
                assert lb.pending is not None
                self._wait(lb.pending)
        if staged.ids or layer not in self._tables_by_layer:
            block_table, slot_blocks = self._build_tables(layer, staged)
        else:
            block_table, slot_blocks = self._tables_by_layer[layer]
        meta = AttentionMetadata(
            is_prefill=False, slot_blocks=slot_blocks, slot_offsets=self.offsets,
            seq_lens=[1] * len(self.tables), block_table=block_table,
            context_lens=self.attend_lens, max_context=max(self.context_lens) + 1)
        return self.kv.gpu, meta

    def _build_tables(self, layer: int, staged: _StagedLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's block table [B, M] int32 and new-token slot blocks [B], on the device."""
        rows, slot_blocks = [], []
        for table, ctx in zip(self.tables, self.context_lens, strict=True):
            ids = staged.ids.get(table.request_id, table.layers[layer].gpu_blocks)
            row = ids[:self.max_blocks]
            rows.append(row + [0] * (self.max_blocks - len(row)))
            slot_blocks.append(ids[ctx // self.bs])
        return (torch.tensor(rows, dtype=torch.int32).to(self.device, non_blocking=True),
                self._to_device(slot_blocks))

    def _prebuild(self) -> None:
        """Tables of all layers where every request reads GPU blocks, in one transfer: [L, B, M]."""
        layers = [i for i in range(len(self.tables[0].layers))
                  if all(t.layers[i].gpu_blocks for t in self.tables)]
        if not layers:
            return
        rows = [[(t.layers[i].gpu_blocks[:self.max_blocks] + [0] * self.max_blocks)[:self.max_blocks]
                 for t in self.tables] for i in layers]
        tables = torch.tensor(rows, dtype=torch.int32).to(self.device)  # [L', B, M]
        pos = torch.tensor([c // self.bs for c in self.context_lens], device=self.device)
        slots = tables.gather(2, pos[None, :, None].expand(len(layers), -1, 1))[..., 0].long()  # [L', B]
        self._tables_by_layer = {layer: (tables[j], slots[j]) for j, layer in enumerate(layers)}

    def abandon(self) -> None:
        for staged in self._staged.values():
            if staged.load is not None:
                staged.load.wait()  # a load may still be writing into these blocks
            for ids in staged.ids.values():
                self.manager.staging.release(ids)
        self._staged = {}

    def end_layer(self, layer: int) -> None:
        """Write the block holding each host-home request's new token back to its host block."""
        staged = self._staged.pop(layer)
        if not staged.ids:
            return
        src, dst = [], []
        for table, ctx in zip(self.tables, self.context_lens, strict=True):
            ids = staged.ids.get(table.request_id)
            if ids is not None:
                src.append(ids[ctx // self.bs])
                dst.append(table.layers[layer].host_blocks[ctx // self.bs])
                self.stats.offloaded(table.request_id, self.block_bytes)
        handle = self.copy.copy_blocks(self.kv.gpu, src, self.kv.host, dst)
        for table in self.tables:
            ids = staged.ids.get(table.request_id)
            if ids is not None:
                table.layers[layer].pending = handle  # its host blocks are being written
                self.manager.staging.release_after(ids, handle)
