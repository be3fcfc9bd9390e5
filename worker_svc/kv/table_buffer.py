"""Persistent block tables (vLLM v1 input-batch style): one row per request, updated by what
changed, so a step's tables and copy lists are indexes into it instead of a rebuild from lists.

Row ``r`` holds, per layer, for one request:
* ``ids`` [L, R, M] int32 on the device: the GPU-tier block ids attention reads (its own blocks for
  a layer that reads GPU blocks; 0 for a host-read layer, whose staging ids are lent per step),
  padded with block 0;
* ``host_read`` [L, R] bool: the layer is read through staging;
* ``host_ids`` [L, R, M] int32 (host memory): the host-tier block ids of a host-read layer (what a
  step writes back to), 0 elsewhere;
* ``run_start``/``run_len`` [L, R, K] and ``run_count`` [L, R] int64: the same host ids as runs of
  consecutive ids (what a step streams in: one copy per run, however long the context).
With ``host_offset`` (host layers read in place, ``kv_cache``) a host-home layer's ids are its
host ids shifted into the one compute tensor, and nothing is read through staging.
* ``tail`` [L, R] int32 on the device: ``ids[:, r, blocks - 1]``, the last block of each layer (the
  block a decode writes: a step of decodes reads its slots here, not with a gather over ``ids``,
  whose rows lie a page apart);
* ``row_blocks`` [R] int64: blocks per layer written in each row.
A row is rewritten when its table is new (admission, re-admission after a recompute preemption) or
its ``version`` moved (a swap-out or a promotion changed a layer's blocks); growth writes only the
new tail (and extends or adds a run). A batch of the same tables as the previous call is synced by
comparing each table's (version, blocks) with the last call's, in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, compress, count
from operator import attrgetter, is_, ne
from typing import Any

import numpy as np
import torch

from worker_svc.kv.block_table import LayerBlockTable
from worker_svc.kv.id_tensor import id_tensor


@dataclass
class _Row:
    index: int
    table: LayerBlockTable  # the table object synced (a re-admitted request has a new one)
    version: int
    blocks: int  # blocks per layer written


_sync_state = attrgetter("version", "blocks_per_layer")  # what a row is synced to, besides its table


def _runs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first id, length) of each run of consecutive ids in ``ids`` [n] (n >= 1)."""
    begins = np.flatnonzero(np.diff(ids) != 1) + 1  # [K - 1]
    edges = np.concatenate(([0], begins, [len(ids)]))  # [K + 1]
    return ids[edges[:-1]], np.diff(edges)


class BlockTableBuffer:
    def __init__(self, num_layers: int, rows: int = 8, blocks: int = 16,
                 device: torch.device | None = None, host_offset: int | None = None) -> None:
        self.num_layers = num_layers
        self.host_offset = host_offset
        self.device = device or torch.device("cpu")
        # [L, R, M] int32 on the device: a step's tables are gathered there, and an update is a
        # small write of the blocks that changed
        self.ids = torch.zeros((num_layers, rows, blocks), dtype=torch.int32, device=self.device)
        self.host_read = torch.zeros((num_layers, rows), dtype=torch.bool)  # [L, R] layer read via staging
        self.host_ids = np.zeros((num_layers, rows, blocks), dtype=np.int32)  # [L, R, M]
        self.run_start = np.zeros((num_layers, rows, 4), dtype=np.int64)  # [L, R, K]
        self.run_len = np.zeros((num_layers, rows, 4), dtype=np.int64)  # [L, R, K]
        self.run_count = np.zeros((num_layers, rows), dtype=np.int64)  # [L, R]
        # Staging block tables of recent steps, reused while the batch's layout is unchanged
        # (``StepAccess`` owns the keys; a few entries: one per host-row set and pool side).
        self.staged_tables: dict[tuple[object, ...], torch.Tensor] = {}
        self.tail = torch.zeros((num_layers, rows), dtype=torch.int32, device=self.device)  # [L, R]
        self.row_blocks = np.zeros(rows, dtype=np.int64)  # [R]
        self._rows: dict[str, _Row] = {}
        self._free: list[int] = list(range(rows - 1, -1, -1))
        self.in_order = False  # the last ``rows_for`` gave rows 0..B-1 in batch order
        # The last call's batch: its tables, their (version, blocks) and the row indices returned.
        self._last_tables: list[LayerBlockTable] = []
        self._last_state: list[tuple[int, int]] = []
        self._last_out: torch.Tensor = torch.zeros(0, dtype=torch.int64)

    def rows_for(self, tables: Sequence[LayerBlockTable],
                 live: Mapping[str, LayerBlockTable]) -> torch.Tensor:
        """Bring the rows of ``tables`` up to date; their row indices [B] int64. ``live``: every
        table holding blocks now (rows of any other request are reclaimed when rows run out)."""
        state = list(map(_sync_state, tables))  # [(version, blocks)] of each table
        last = self._last_tables
        if len(tables) == len(last) and all(map(is_, tables, last)):
            # The previous batch again (a steady decode): only rows whose table moved need work,
            # and their row indices are unchanged (a row is reassigned only for a new table).
            if state != self._last_state:
                grown: list[_Row] = []
                rows = self._rows
                # the tables whose (version, blocks) moved, found by C-level maps (no loop over the batch)
                for i in compress(count(), map(ne, state, self._last_state)):
                    table = tables[i]
                    self._sync(rows[table.request_id], table, grown)
                if grown:
                    self._write_growth(grown)
                self._last_state = state
            return self._last_out
        out = []
        grown = []
        rows = self._rows
        for table in tables:
            row = rows.get(table.request_id)
            if row is None or row.table is not table:
                if row is not None:
                    self._free.append(row.index)
                row = _Row(self._take_row(live), table, table.version, 0)
                rows[table.request_id] = row
                self._write(row, 0)
            else:
                self._sync(row, table, grown)
            out.append(row.index)
        if grown:
            self._write_growth(grown)
        self.in_order = out == list(range(len(out)))  # rows 0..B-1: a step can take a view
        self._last_tables, self._last_state = list(tables), state
        self._last_out = id_tensor(out)
        return self._last_out

    def _sync(self, row: _Row, table: LayerBlockTable, grown: list[_Row]) -> None:
        """Rewrite ``row`` if its table's version moved, or write its growth (one block: into ``grown``)."""
        if row.version != table.version:
            row.version = table.version
            self._write(row, 0)
        elif row.blocks < table.blocks_per_layer:
            if row.blocks + 1 == table.blocks_per_layer:
                grown.append(row)
            else:
                self._write(row, row.blocks)

    def _write_growth(self, grown: list[_Row]) -> None:
        """Write the one new block of every layer of each row in ``grown`` (a decode's growth), in
        one device write for all of them: ``_write`` per row cost a few small tensor ops each."""
        n_max = max(row.blocks for row in grown) + 1
        m = self.ids.shape[2]
        if n_max > m:
            self.ids = _grown(self.ids, 2, max(n_max, 2 * m))
            self.host_ids = _grown(self.host_ids, 2, max(n_max, 2 * m))
        off = self.host_offset
        vals, host_rows = [], []
        zeros = [0] * self.num_layers
        for row in grown:
            j = row.blocks
            layers = row.table.layers
            gpu_at, host_at, _, _ = row.table.read_split  # (kept per table version)
            if not host_at:  # every layer in its GPU blocks (most rows)
                vals.append([lb.gpu_blocks[j] for lb in layers])
                continue
            v = zeros.copy()  # a host-read layer's id is 0 (its staging ids are lent per step) ...
            for i in gpu_at:
                v[i] = layers[i].gpu_blocks[j]
            if off is not None:  # ... or, in place, its host id shifted
                for i in host_at:
                    v[i] = off + layers[i].host_blocks[j]
            else:
                host_rows.append(row)
            vals.append(v)
        at_row_np = np.array([row.index for row in grown], dtype=np.int64)  # [G]
        at_block = np.array([row.blocks for row in grown], dtype=np.int64)  # [G]
        new = torch.from_numpy(np.array(vals, dtype=np.int32).T.copy()).to(self.device)  # [L, G]
        # One flat scatter into ids (an index per (layer, row)), and the same values are the tails.
        r, m = self.ids.shape[1], self.ids.shape[2]
        flat = (np.arange(self.num_layers)[:, None] * (r * m) + (at_row_np * m + at_block)[None, :])  # [L, G]
        # (index_copy_: a tensor index through __setitem__ costs several times the op itself)
        self.ids.view(-1).index_copy_(0, torch.from_numpy(flat.reshape(-1)).to(self.device), new.reshape(-1))
        self.tail.index_copy_(1, torch.from_numpy(at_row_np).to(self.device), new)
        self.row_blocks[at_row_np] += 1
        for row in grown:
            row.blocks += 1
        if host_rows:
            self._grow_runs(host_rows)

    def _grow_runs(self, rows: list[_Row]) -> None:
        """Host ids and runs of the one new block of each host-read layer of ``rows`` (already
        counted in ``row.blocks``): array ops over every (layer, row) pair at once."""
        pl_parts, pr_parts, ids_parts, j_parts = [], [], [], []
        for row in rows:
            j = row.blocks - 1
            hosts = row.table.read_split[1]
            layers = row.table.layers
            pl_parts.append(hosts)
            pr_parts.append([row.index] * len(hosts))
            ids_parts.append([layers[i].host_blocks[j] for i in hosts])
            j_parts.append([j] * len(hosts))
        pl = np.fromiter(chain.from_iterable(pl_parts), dtype=np.int64)  # [P] layer of each pair
        pr = np.fromiter(chain.from_iterable(pr_parts), dtype=np.int64)  # [P] buffer row
        ids = np.fromiter(chain.from_iterable(ids_parts), dtype=np.int64)  # [P] the new host id
        pj = np.fromiter(chain.from_iterable(j_parts), dtype=np.int64)  # [P] its block index
        self.host_ids[pl, pr, pj] = ids
        c = self.run_count[pl, pr]  # [P]
        fresh = c == 0  # a row whose host layer had no block yet (not after a prefill)
        last = np.maximum(c - 1, 0)
        ends = self.run_start[pl, pr, last] + self.run_len[pl, pr, last]
        extend = ~fresh & (ids == ends)
        self.run_len[pl[extend], pr[extend], last[extend]] += 1
        adds = ~extend
        if adds.any():
            self._reserve_runs(int(c.max()) + 1)
            at = c[adds]
            self.run_start[pl[adds], pr[adds], at] = ids[adds]
            self.run_len[pl[adds], pr[adds], at] = 1
            self.run_count[pl[adds], pr[adds]] = at + 1

    def _take_row(self, live: Mapping[str, LayerBlockTable]) -> int:
        if not self._free:
            for rid, row in list(self._rows.items()):
                if live.get(rid) is not row.table:
                    del self._rows[rid]
                    self._free.append(row.index)
        if not self._free:
            r = self.ids.shape[1]
            self.ids = _grown(self.ids, 1, 2 * r)
            self.host_read = _grown(self.host_read, 1, 2 * r)
            self.host_ids = _grown(self.host_ids, 1, 2 * r)
            self.run_start = _grown(self.run_start, 1, 2 * r)
            self.run_len = _grown(self.run_len, 1, 2 * r)
            self.run_count = _grown(self.run_count, 1, 2 * r)
            self.tail = _grown(self.tail, 1, 2 * r)
            self.row_blocks = _grown(self.row_blocks, 0, 2 * r)
            self._free = list(range(2 * r - 1, r - 1, -1))
        return self._free.pop()

    def _write(self, row: _Row, start: int) -> None:
        """Write blocks ``start ..`` of every layer of ``row``'s table (``start == 0``: the whole row)."""
        table, r = row.table, row.index
        n = table.blocks_per_layer
        m = self.ids.shape[2]
        if n > m:
            self.ids = _grown(self.ids, 2, max(n, 2 * m))
            self.host_ids = _grown(self.host_ids, 2, max(n, 2 * m))
        if start == 0:
            self.ids[:, r] = 0
            self.host_ids[:, r] = 0
            self.run_count[:, r] = 0
            self.run_len[:, r] = 0  # runs past a layer's count have length 0 (a step reads them unmasked)
            if self.host_offset is None:
                self.host_read[:, r] = torch.tensor([not lb.reads_gpu_blocks for lb in table.layers])
        if n <= start:
            self._set_tail(row, n)
            return
        reads = table.reads_gpu
        if self.host_offset is not None:  # in place: a host layer's ids, shifted; no staging
            off = self.host_offset
            tail = [lb.gpu_blocks[start:n] if gpu else [off + h for h in lb.host_blocks[start:n]]
                    for lb, gpu in zip(table.layers, reads, strict=True)]
            flat = id_tensor(list(chain.from_iterable(tail))).to(torch.int32)
            self.ids[:, r, start:n] = flat.view(len(tail), n - start).to(self.device)
            self._set_tail(row, n)
            return
        pad = [0] * (n - start)
        tail = [lb.gpu_blocks[start:n] if gpu else pad for lb, gpu in zip(table.layers, reads, strict=True)]
        ids = list(chain.from_iterable(tail))
        # a decode's growth (a block per layer) skips the numpy trip; a whole row needs it
        flat = torch.tensor(ids, dtype=torch.int32) if n - start <= 2 else id_tensor(ids).to(torch.int32)
        self.ids[:, r, start:n] = flat.view(len(tail), n - start).to(self.device)  # [L, n - start]
        host = [i for i, gpu in enumerate(reads) if not gpu]
        if host:
            new = np.array([table.layers[i].host_blocks[start:n] for i in host], dtype=np.int64)  # [Lh, g]
            self.host_ids[host, r, start:n] = new
            self._append_runs(np.array(host), r, new, start == 0)
        self._set_tail(row, n)

    def _set_tail(self, row: _Row, n: int) -> None:
        """``row`` holds ``n`` blocks per layer now: its block count and tails follow."""
        row.blocks = n
        self.row_blocks[row.index] = n
        if n:
            self.tail[:, row.index] = self.ids[:, row.index, n - 1]
        else:
            self.tail[:, row.index] = 0

    def _append_runs(self, layers: np.ndarray, r: int, new: np.ndarray, fresh: bool) -> None:
        """Add host ids ``new`` [Lh, g] after the runs of ``layers`` in row ``r`` (``fresh``: no runs yet)."""
        if not fresh and new.shape[1] == 1:  # a decode's growth: extend each layer's last run or add one
            c = self.run_count[layers, r]  # [Lh] >= 1
            ids = new[:, 0]
            ends = self.run_start[layers, r, c - 1] + self.run_len[layers, r, c - 1]
            extend = ids == ends
            self.run_len[layers[extend], r, c[extend] - 1] += 1
            adds = layers[~extend]
            if adds.size:
                self._reserve_runs(int(c.max()) + 1)
                at = self.run_count[adds, r]
                self.run_start[adds, r, at] = ids[~extend]
                self.run_len[adds, r, at] = 1
                self.run_count[adds, r] = at + 1
            return
        for layer, ids in zip(layers.tolist(), new, strict=True):
            starts, lens = _runs(ids)
            c = int(self.run_count[layer, r])
            if c and self.run_start[layer, r, c - 1] + self.run_len[layer, r, c - 1] == starts[0]:
                self.run_len[layer, r, c - 1] += lens[0]  # the tail continues the last run
                starts, lens = starts[1:], lens[1:]
            self._reserve_runs(c + len(starts))
            self.run_start[layer, r, c:c + len(starts)] = starts
            self.run_len[layer, r, c:c + len(starts)] = lens
            self.run_count[layer, r] = c + len(starts)

    def _reserve_runs(self, k: int) -> None:
        if k > self.run_start.shape[2]:
            size = max(k, 2 * self.run_start.shape[2])
            self.run_start = _grown(self.run_start, 2, size)
            self.run_len = _grown(self.run_len, 2, size)


def _grown(a: Any, dim: int, size: int) -> Any:
    """``a`` (a tensor or an array) zero-padded along ``dim`` to ``size``, on the same device."""
    shape = list(a.shape)
    old, shape[dim] = shape[dim], size
    out: Any
    if isinstance(a, torch.Tensor):
        out = torch.zeros(shape, dtype=a.dtype, device=a.device)
    else:
        out = np.zeros(shape, dtype=a.dtype)
    index = [slice(None)] * len(shape)
    index[dim] = slice(0, old)
    out[tuple(index)] = a
    return out
