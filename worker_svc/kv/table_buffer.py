"""Persistent block tables (vLLM v1 input-batch style): one tensor row per request, updated by
what changed, so a step's tables are one index into it instead of a rebuild from Python lists.

Row ``r`` of ``ids`` [L, R, M] (and of ``host_read`` [L, R]) holds, per layer, the GPU-tier block
ids attention reads for one request (its own blocks for a layer that reads GPU blocks; 0 for a
host-read layer, whose staging ids are lent per step), padded with block 0. A row is rewritten
when its table is new (admission, re-admission after a recompute preemption) or its ``version``
moved (a swap-out or a promotion changed a layer's blocks); growth writes only the new tail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from worker_svc.kv.block_table import LayerBlockTable
from worker_svc.kv.id_tensor import id_tensor


@dataclass
class _Row:
    index: int
    table: LayerBlockTable  # the table object synced (a re-admitted request has a new one)
    version: int
    blocks: int  # blocks per layer written


class BlockTableBuffer:
    def __init__(self, num_layers: int, rows: int = 8, blocks: int = 16,
                 device: torch.device | None = None) -> None:
        self.num_layers = num_layers
        self.device = device or torch.device("cpu")
        # [L, R, M] int32 on the device: a step's tables are gathered there, and an update is a
        # small write of the blocks that changed
        self.ids = torch.zeros((num_layers, rows, blocks), dtype=torch.int32, device=self.device)
        self.host_read = torch.zeros((num_layers, rows), dtype=torch.bool)  # [L, R] layer read via staging
        self._rows: dict[str, _Row] = {}
        self._free: list[int] = list(range(rows - 1, -1, -1))
        self.in_order = False  # the last ``rows_for`` gave rows 0..B-1 in batch order

    def rows_for(self, tables: Sequence[LayerBlockTable],
                 live: Mapping[str, LayerBlockTable]) -> torch.Tensor:
        """Bring the rows of ``tables`` up to date; their row indices [B] int64. ``live``: every
        table holding blocks now (rows of any other request are reclaimed when rows run out)."""
        out = []
        for table in tables:
            row = self._rows.get(table.request_id)
            if row is None or row.table is not table:
                if row is not None:
                    self._free.append(row.index)
                row = _Row(self._take_row(live), table, table.version, 0)
                self._rows[table.request_id] = row
                self._write(row, 0)
            elif row.version != table.version:
                row.version = table.version
                self._write(row, 0)
            elif row.blocks < table.blocks_per_layer:
                self._write(row, row.blocks)
            out.append(row.index)
        self.in_order = out == list(range(len(out)))  # rows 0..B-1: a step can take a view
        return id_tensor(out)

    def _take_row(self, live: Mapping[str, LayerBlockTable]) -> int:
        if not self._free:
            for rid, row in list(self._rows.items()):
                if live.get(rid) is not row.table:
                    del self._rows[rid]
                    self._free.append(row.index)
        if not self._free:
            layers, r, m = self.ids.shape
            grown = torch.zeros((layers, 2 * r, m), dtype=torch.int32, device=self.device)
            grown[:, :r] = self.ids
            self.ids = grown
            host = torch.zeros((layers, 2 * r), dtype=torch.bool)
            host[:, :r] = self.host_read
            self.host_read = host
            self._free = list(range(2 * r - 1, r - 1, -1))
        return self._free.pop()

    def _write(self, row: _Row, start: int) -> None:
        """Write blocks ``start ..`` of every layer of ``row``'s table (``start == 0``: the whole row)."""
        table = row.table
        n = table.blocks_per_layer
        if n > self.ids.shape[2]:
            layers, r, m = self.ids.shape
            grown = torch.zeros((layers, r, max(n, 2 * m)), dtype=torch.int32, device=self.device)
            grown[:, :, :m] = self.ids
            self.ids = grown
        if start == 0:
            self.ids[:, row.index] = 0
            self.host_read[:, row.index] = torch.tensor([not lb.reads_gpu_blocks for lb in table.layers])
        if n > start:
            pad = [0] * (n - start)
            tail = [lb.gpu_blocks[start:n] if lb.reads_gpu_blocks else pad for lb in table.layers]
            flat = id_tensor(list(chain.from_iterable(tail))).to(device=self.device, dtype=torch.int32)
            self.ids[:, row.index, start:n] = flat.view(len(tail), n - start)  # [L, n - start]
        row.blocks = n
