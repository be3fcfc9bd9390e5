"""The model's view of the KV cache for one step (``LayerKVAccess``): per-layer metadata, staging,
and the copies around each layer.

A step is a list of segments, one per request: request ``i`` computes the tokens at positions
``starts[i] .. starts[i] + lens[i] - 1`` of its sequence (a decode is a segment of one token, a
prefill chunk a longer one; a first chunk starts at 0). A GPU-home layer reads and writes its own
blocks. A host-home layer is computed in staging blocks: its first ``starts[i]`` tokens (earlier
chunks, or the context of a decode) are streamed in while the previous layer computes, and after
attention the blocks the segment wrote are copied back to its host blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import chain

import torch

from worker_svc.attention import AttentionMetadata
from worker_svc.kv.block_table import LayerBlockTable
from worker_svc.kv.id_tensor import id_tensor
from worker_svc.kv.kv_cache import KVCache
from worker_svc.kv.manager import KVCacheManager
from worker_svc.kv.offload import CopyEngine, CopyHandle
from worker_svc.kv.table_buffer import BlockTableBuffer


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_FEW_ROWS = 4  # host-read rows of a layer up to which staging ids are written row by row


def _ragged_index(rows: list[int], counts: list[int], width: int) -> torch.Tensor:
    """Flat positions of the first ``counts[k]`` entries of row ``rows[k]`` of a [*, width] tensor."""
    n = id_tensor(counts)
    first = id_tensor(rows) * width  # [K]
    starts = torch.cumsum(n, 0) - n  # [K] where each row's entries begin in the flat list
    return torch.arange(int(n.sum())) + torch.repeat_interleave(first - starts, n)  # [sum(counts)]


class StepAccess:
    """Segments of ``tables`` (same order): request ``i`` computes ``lens[i]`` tokens from ``starts[i]``."""

    def __init__(self, tables: list[LayerBlockTable], starts: list[int], lens: list[int], kv: KVCache,
                 manager: KVCacheManager, copy: CopyEngine, stats: CopyStats,
                 buffer: BlockTableBuffer) -> None:
        assert tables and len(tables) == len(starts) == len(lens), "one segment per request"
        self.tables, self.starts, self.lens = tables, starts, lens
        self.kv, self.manager, self.copy, self.stats = kv, manager, copy, stats
        self.bs = kv.geometry.block_size
        self.device = kv.gpu.device
        self.block_bytes = kv.geometry.bytes_per_block
        self.num_layers = len(tables[0].layers)
        self.ends = [s + n for s, n in zip(starts, lens, strict=True)]
        # Only whole prompts from slot 0: attention can use the fresh K/V, no block table needed.
        self.fresh = all(s == 0 for s in starts)
        self.max_blocks = max(_cdiv(e, self.bs) for e in self.ends)
        lens_t = id_tensor(lens)
        self._tok_row = torch.repeat_interleave(torch.arange(len(tables)), lens_t)  # [T]
        cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
        torch.cumsum(lens_t, 0, out=cu[1:])  # [B+1]
        # Position of every token: its request's start plus its index inside the segment.
        first = id_tensor(starts) - cu[:-1]  # [B]
        pos = torch.arange(int(cu[-1])) + torch.repeat_interleave(first, lens_t)  # [T]
        self._tok_row = self._tok_row.to(self.device)
        self._tok_block = (pos // self.bs).to(self.device)  # [T] which of its request's blocks
        self.offsets = (pos % self.bs).to(self.device)  # [T]
        self.cu_seqlens = cu.to(torch.int32).to(self.device)  # [B+1]
        self.context_lens = id_tensor(self.ends).to(torch.int32).to(self.device)  # [B]
        self._staged: dict[int, _StagedLayer] = {}
        self._prebuilt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        row_index = buffer.rows_for(tables, manager.tables)  # [B]
        # [L, B, M] int32 GPU-read block ids of every layer: a view when the batch holds rows
        # 0..B-1 in order (a steady batch), else gathered on the device in one op
        if buffer.in_order:
            self._rows_all = buffer.ids[:, :len(tables), :self.max_blocks]
            self._host_read = buffer.host_read[:, :len(tables)]  # [L, B] on the host
        else:
            self._rows_all = buffer.ids[:, row_index.to(self.device), :self.max_blocks]
            self._host_read = buffer.host_read[:, row_index]
        self._prebuild()
        batch = {id(t) for t in tables}
        self._loading = [(t, layer) for t, layer in manager.loading() if id(t) in batch]

    def _wait(self, handle: CopyHandle) -> None:
        """Order compute after a copy; count host time only when it is not already done."""
        if not handle.done():
            start = time.perf_counter()
            handle.wait()
            self.stats.wait_s += time.perf_counter() - start
        handle.order_compute_after()

    def _prebuild(self) -> None:
        """Tables and slots of every layer that all requests read in their own GPU blocks, at once."""
        # (layer, row) of every host-read segment, grouped by layer: the staging work of the step
        self._host_rows: dict[int, list[int]] = {}
        for layer, row in torch.nonzero(self._host_read).tolist():
            self._host_rows.setdefault(layer, []).append(row)
        layers = [i for i in range(self.num_layers) if i not in self._host_rows]
        if not layers:
            return
        rows = self._rows_all  # [L', B, M]
        if len(layers) < self.num_layers:
            rows = rows[torch.tensor(layers, device=self.device)]
        slots = rows[:, self._tok_row, self._tok_block]  # [L', T]
        self._prebuilt = {layer: (rows[j], slots[j]) for j, layer in enumerate(layers)}

    def _prefetch(self, layer: int) -> None:
        """Stream layer ``layer``'s host-home KV into staging blocks (one copy call for all requests)."""
        staged = _StagedLayer()
        src: list[int] = []
        dst: list[int] = []
        for i in self._host_rows.get(layer, []):
            table, start, end = self.tables[i], self.starts[i], self.ends[i]
            lb = table.layers[layer]
            ids = self.manager.staging.allocate(_cdiv(end, self.bs))
            staged.ids[table.request_id] = ids
            filled = _cdiv(start, self.bs)
            src += lb.host_blocks[:filled]
            dst += ids[:filled]
            if filled:
                self.stats.loaded(table.request_id, filled * self.block_bytes)
        if src:
            staged.load = self.copy.copy_blocks(self.kv.host, src, self.kv.gpu, dst)
        self._staged[layer] = staged

    def begin_layer(self, layer: int) -> tuple[torch.Tensor, AttentionMetadata]:
        if layer == 0:
            self._prefetch(0)
        if layer + 1 < self.num_layers:
            self._prefetch(layer + 1)  # overlaps this layer's compute
        staged = self._staged[layer]
        if staged.load is not None:
            self._wait(staged.load)
        for table, loading in self._loading:
            lb = table.layers[loading]
            if loading == layer and lb.pending is not None:  # a promotion in flight: wait for it
                self._wait(lb.pending)
        if layer in self._prebuilt and not staged.ids:
            block_table, slot_blocks = self._prebuilt[layer]
        else:
            rows = self._rows_all[layer].clone(memory_format=torch.contiguous_format)  # [B, M]
            # The staging ids of the host-read requests, in one tensor write (each has as many as its
            # end needs, <= M; the rest of its row stays block 0).
            which = self._host_rows[layer]
            if len(which) <= _FEW_ROWS:  # a write per row costs less than building the ragged index
                for i in which:
                    ids = staged.ids[self.tables[i].request_id]
                    rows[i, :len(ids)] = id_tensor(ids).to(device=self.device, dtype=torch.int32)
            else:
                lists = [staged.ids[self.tables[i].request_id] for i in which]
                where = _ragged_index(which, [len(ids) for ids in lists], self.max_blocks).to(self.device)
                flat = id_tensor(list(chain.from_iterable(lists)))
                rows.view(-1)[where] = flat.to(device=self.device, dtype=torch.int32)
            slot_blocks = rows[self._tok_row, self._tok_block]  # [T]
            block_table = rows  # [B, M]
        if self.fresh:
            meta = AttentionMetadata(is_prefill=True, slot_blocks=slot_blocks, slot_offsets=self.offsets,
                                     seq_lens=self.lens, cu_seqlens=self.cu_seqlens)
        else:
            meta = AttentionMetadata(
                is_prefill=False, slot_blocks=slot_blocks, slot_offsets=self.offsets, seq_lens=self.lens,
                cu_seqlens=self.cu_seqlens, block_table=block_table, context_lens=self.context_lens,
                max_context=max(self.ends), context_list=self.ends)
        return self.kv.gpu, meta

    def end_layer(self, layer: int) -> None:
        """Write the blocks each host-home segment wrote back to the request's host blocks."""
        staged = self._staged.pop(layer)
        if not staged.ids:
            return
        src, dst = [], []
        for table, start, end in zip(self.tables, self.starts, self.ends, strict=True):
            ids = staged.ids.get(table.request_id)
            if ids is None:
                continue
            written = range(start // self.bs, _cdiv(end, self.bs))
            src += [ids[b] for b in written]
            dst += [table.layers[layer].host_blocks[b] for b in written]
            self.stats.offloaded(table.request_id, len(written) * self.block_bytes)
        handle = self.copy.copy_blocks(self.kv.gpu, src, self.kv.host, dst)
        for table in self.tables:
            ids = staged.ids.get(table.request_id)
            if ids is not None:
                self.manager.set_pending(table, layer, handle)  # its host blocks are being written
                self.manager.staging.release_after(ids, handle)

    def abandon(self) -> None:
        """Return the staging blocks this step still holds (the forward failed midway)."""
        for staged in self._staged.values():
            if staged.load is not None:
                staged.load.wait()  # a load may still be writing into these blocks
            for ids in staged.ids.values():
                self.manager.staging.release(ids)
        self._staged = {}
