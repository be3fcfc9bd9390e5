"""The model's view of the KV cache for one step (``LayerKVAccess``): per-layer metadata, staging,
and the copies around each layer.

A step is a list of segments, one per request: request ``i`` computes the tokens at positions
``starts[i] .. starts[i] + lens[i] - 1`` of its sequence (a decode is a segment of one token, a
prefill chunk a longer one; a first chunk starts at 0). A GPU-home layer reads and writes its own
blocks. A host-home layer is computed in staging blocks: its first ``starts[i]`` tokens (earlier
chunks, or the context of a decode) are streamed in while the previous layer computes, and after
attention the blocks the segment wrote are copied back to its host blocks. Each host-read layer
takes one contiguous staging range per step, and its copy lists are runs computed with array ops
from the persistent buffer (``table_buffer``): the host work of a step grows with the number of
requests and copy runs, not with their contexts.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from worker_svc.attention import AttentionMetadata
from worker_svc.kv.block_table import LayerBlockTable
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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pair_runs(src: np.ndarray, dst: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Block pairs ``src[i] -> dst[i]`` [n] as runs [K, 3] of (src, dst, length), array ops only; a
    run never spans two values of ``group`` [n]."""
    if not len(src):
        return np.zeros((0, 3), dtype=np.int64)
    begins = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1) | (np.diff(group) != 0)) + 1
    edges = np.concatenate(([0], begins, [len(src)]))
    return np.stack((src[edges[:-1]], dst[edges[:-1]], np.diff(edges)), axis=1).astype(np.int64)


@dataclass
class _HostLayer:
    """The staging work of one host-read layer in one step (ids relative to its staging range)."""

    key: bytes  # which batch rows read this layer through staging
    blocks: int  # staging blocks the layer takes: every host-read request's whole context
    offsets: np.ndarray  # [B] where each row's blocks begin in the range (0 for other rows)
    load: np.ndarray  # [K, 3] runs (host id, staging offset, length) streamed in before compute
    store: np.ndarray  # [K, 3] runs (staging offset, host id, length) written back after attention
    base: int = -1  # first staging id, once taken
    handle: CopyHandle | None = None  # the stream-in


class _Steady:
    """Views of a buffer's first ``B`` rows and ``M`` columns (a steady batch's), kept between steps.

    They stay the buffer's own while its tensors do: growth writes into them in place, and a buffer
    that outgrows a tensor replaces it (``matches`` then fails and the views are made again)."""

    def __init__(self, buffer: BlockTableBuffer, b: int, m: int) -> None:
        self.ids, self.tail, self.host_read_t = buffer.ids, buffer.tail, buffer.host_read
        self.rows_all = buffer.ids[:, :b, :m]  # [L, B, M]
        self.host_read = buffer.host_read[:, :b].numpy()  # [L, B], shares the buffer's memory
        self.b = b
        self._decode_layers: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def matches(self, buffer: BlockTableBuffer) -> bool:
        return self.ids is buffer.ids and self.tail is buffer.tail and self.host_read_t is buffer.host_read

    def decode_layers(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer -> (block table [B, M], decode slots [B]: each row's tail) of an all-GPU decode step."""
        if self._decode_layers is None:
            tails = self.tail[:, :self.b].unbind(0)
            self._decode_layers = dict(enumerate(zip(self.rows_all.unbind(0), tails, strict=True)))
        return self._decode_layers


@dataclass
class _Pairs:
    """The host-read (layer, batch row) pairs of a step's rows, by layer (what depends only on which
    rows read which layer through staging, so a steady batch keeps them across steps)."""

    key: tuple[bytes, bytes, int]  # (host_read [L, B], buffer rows [B], buffer row count)
    # (layer, batch row, buffer row, (layer, buffer row) as one flat index) [P] each, each host-read
    # layer's first pair and pair count, and the host-read layers, as arrays
    arrays: tuple[np.ndarray, ...]
    layers: list[int]  # the host-read layers
    keys: list[bytes]  # each one's host-row set (its ``host_read`` row as bytes)
    per_row: np.ndarray  # [B] host-read layers of each batch row


class _BufferViews:
    """What a buffer's steps share across steps: the steady batch's views (``_Steady``, the last two
    shapes: a block boundary moves ``M`` on) and a decode step's token rows per batch size."""

    def __init__(self) -> None:
        self._steady: dict[tuple[int, int], _Steady] = {}
        self._rows: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._aranges: dict[int, np.ndarray] = {}
        self._pairs: _Pairs | None = None

    def steady(self, buffer: BlockTableBuffer, b: int, m: int) -> _Steady:
        hit = self._steady.get((b, m))
        if hit is None or not hit.matches(buffer):
            if len(self._steady) >= 2:
                self._steady.clear()
            hit = self._steady[(b, m)] = _Steady(buffer, b, m)
        return hit

    def pairs(self, hr: np.ndarray, rows: np.ndarray, r: int) -> _Pairs:
        """The host-read pairs of ``hr`` [L, B] for batch rows ``rows`` [B] of a buffer of ``r``
        rows; the last call's again when nothing moved (read only, shared by steps)."""
        key = (hr.tobytes(), rows.tobytes(), r)
        if self._pairs is not None and self._pairs.key == key:
            return self._pairs
        pl, pb = np.nonzero(hr)  # [P] (layer, batch row) of every host-read pair, by layer
        pr = rows[pb]  # [P] buffer rows
        # The host-read layers, each one's first pair and pair count (``pl`` is sorted: np.unique
        # would sort it again)
        first_pair = np.flatnonzero(np.concatenate(([True], pl[1:] != pl[:-1]))) if len(pl) else pl
        layers, per_layer = pl[first_pair], np.diff(np.append(first_pair, len(pl)))
        flat = pl * r + pr  # [P] (layer, row) as one index: one gather each
        arrays = (pl, pb, pr, first_pair, layers, per_layer, flat)
        per_row = np.count_nonzero(hr, axis=0)  # [B]
        for a in (*arrays, per_row):
            a.setflags(write=False)
        listed = layers.tolist()
        self._pairs = _Pairs(key, arrays, listed, [hr[layer].tobytes() for layer in listed], per_row)
        return self._pairs

    def arange(self, b: int) -> np.ndarray:
        hit = self._aranges.get(b)
        if hit is None:
            if len(self._aranges) >= 8:
                self._aranges.clear()
            hit = self._aranges[b] = np.arange(b)
            hit.setflags(write=False)  # shared by steps: never written
        return hit

    def decode_rows(self, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(token rows [B] int64 = 0..B-1, cu_seqlens [B+1] int32 = 0..B) of a decode step; shared
        by steps, read only."""
        hit = self._rows.get((b, device))
        if hit is None:
            if len(self._rows) >= 8:
                self._rows.clear()
            hit = self._rows[(b, device)] = (torch.arange(b, device=device),
                                             torch.arange(b + 1, dtype=torch.int32, device=device))
        return hit


# One per buffer (an engine's), dropped with it.
_VIEWS: weakref.WeakKeyDictionary[BlockTableBuffer, _BufferViews] = weakref.WeakKeyDictionary()


def _views_of(buffer: BlockTableBuffer) -> _BufferViews:
    views = _VIEWS.get(buffer)
    if views is None:
        views = _VIEWS[buffer] = _BufferViews()
    return views


class StepAccess:
    """Segments of ``tables`` (same order): request ``i`` computes ``lens[i]`` tokens from ``starts[i]``."""

    def __init__(self, tables: list[LayerBlockTable], starts: list[int], lens: list[int], kv: KVCache,
                 manager: KVCacheManager, copy: CopyEngine, stats: CopyStats,
                 buffer: BlockTableBuffer) -> None:
        assert tables and len(tables) == len(starts) == len(lens), "one segment per request"
        self.tables, self.starts, self.lens = tables, starts, lens
        self.kv, self.manager, self.copy, self.stats = kv, manager, copy, stats
        self.buffer = buffer
        self.bs = kv.geometry.block_size
        self.device = kv.gpu.device
        self.block_bytes = kv.geometry.bytes_per_block
        self.num_layers = len(tables[0].layers)
        # Token layout in numpy (a few small array ops cost microseconds, their torch versions tens;
        # the scalars from the lists: a numpy reduction costs more than a short list's builtin).
        b = len(tables)
        start_a = np.asarray(starts, dtype=np.int64)  # [B]
        lens_a = np.asarray(lens, dtype=np.int64)  # [B]
        ends_a = start_a + lens_a  # [B]
        self._starts_a, self._ends_a = start_a, ends_a
        self.ends = ends_a.tolist()
        self.max_context = max(self.ends)
        self.max_position = self.max_context - 1  # the step's largest token position (RoPE's table)
        # Only whole prompts from slot 0: attention can use the fresh K/V, no block table needed.
        self.fresh = not any(starts)
        self.max_blocks = _cdiv(self.max_context, self.bs)
        self._decodes = b == sum(lens)
        views = _views_of(buffer)
        if self._decodes:  # all decodes: token i is request i's one new token
            tok_row, pos = views.arange(b), start_a
            self._tok_row, self.cu_seqlens = views.decode_rows(b, self.device)  # [T], [B+1] (shared)
        else:
            cu = np.zeros(b + 1, dtype=np.int64)
            np.cumsum(lens_a, out=cu[1:])  # [B+1]
            tok_row = np.repeat(np.arange(b), lens_a)  # [T]
            # Position of every token: its request's start plus its index inside the segment.
            pos = np.arange(cu[-1]) + np.repeat(start_a - cu[:-1], lens_a)  # [T]
            self._tok_row = torch.from_numpy(tok_row).to(self.device)  # [T]
            self.cu_seqlens = torch.from_numpy(cu.astype(np.int32)).to(self.device)  # [B+1]
        self._tok_row_np, self._tok_block_np = tok_row, pos // self.bs  # [T] each
        self._tok_block = torch.from_numpy(self._tok_block_np).to(self.device)  # [T] block of its request
        self.offsets = torch.from_numpy(pos % self.bs).to(self.device)  # [T]
        self.context_lens = torch.from_numpy(ends_a.astype(np.int32)).to(self.device)  # [B]
        self._prebuilt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        row_index = buffer.rows_for(tables, manager.tables)  # [B]
        self._row_index = row_index.numpy()
        self._row_index_t = row_index if buffer.in_order else row_index.to(self.device)
        # [L, B, M] int32 GPU-read block ids of every layer: a view when the batch holds rows
        # 0..B-1 in order (a steady batch; the views are kept between steps), else gathered on the
        # device in one op
        self._steady = views.steady(buffer, b, self.max_blocks) if buffer.in_order else None
        if self._steady is not None:
            self._rows_all, self._host_read = self._steady.rows_all, self._steady.host_read
        else:
            self._rows_all = buffer.ids[:, self._row_index_t, :self.max_blocks]
            self._host_read = buffer.host_read[:, row_index].numpy()
        self._host: dict[int, _HostLayer] = {}
        self._loaded_blocks = self._stored_blocks = np.zeros(len(tables), dtype=np.int64)  # [B]
        self._last_host_layer = -1
        if self._host_read.any():
            self._plan_host_layers()
        self._prebuild()
        loading = manager.loading()  # promotions in flight (rare): the batch's are waited for
        batch = {id(t) for t in tables} if loading else set()
        self._loading = [(t, layer) for t, layer in loading if id(t) in batch]
        self._last_store: CopyHandle | None = None
        self._staged_slots: dict[tuple[object, ...], torch.Tensor] = {}  # layout -> slots [T]

    def _wait(self, handle: CopyHandle) -> None:
        """Order compute after a copy; count host time only when it is not already done."""
        if not handle.done():
            start = time.perf_counter()
            handle.wait()
            self.stats.wait_s += time.perf_counter() - start
        handle.order_compute_after()

    def _plan_host_layers(self) -> None:
        """Staging layout and copy runs of every host-read layer, in array ops over (layer, row) pairs.

        Layer ``l``'s range holds each host-read request's blocks back to back, in batch order:
        block ``j`` of row ``i`` sits at ``offsets[i] + j``. The first ``ceil(start / bs)`` blocks
        are streamed in (one run per run of host ids, read from the persistent buffer), and the
        blocks the segment writes are copied back after attention. No per-block Python."""
        hr, buf, rows = self._host_read, self.buffer, self._row_index  # [L, B], -, [B]
        starts, ends = self._starts_a, self._ends_a  # [B] each
        filled = -(-starts // self.bs)  # [B] blocks holding earlier tokens: streamed in
        used = -(-ends // self.bs)  # [B] blocks the segment reads
        first_written = starts // self.bs  # [B]
        written = used - first_written  # [B] blocks the segment writes: copied back
        # The (layer, row) pairs and their indexes depend only on which rows read which layer
        # through staging: a steady batch's are the previous step's (``_BufferViews.pairs``).
        pairs_of = _views_of(buf).pairs(hr, rows, buf.run_count.shape[1])
        pl, pb, pr, first_pair, layers, per_layer, flat = pairs_of.arrays
        # Where each pair's blocks begin in its layer's range: the blocks of earlier host rows.
        pair_used = used[pb]
        cum = np.cumsum(pair_used) - pair_used  # [P] over all pairs
        offset = cum - np.repeat(cum[first_pair], per_layer)  # [P] restarted at each layer
        # Stream-in runs: the host runs of each pair cut at its filled blocks.
        pairs = buf.run_count.size  # L * R
        counts = buf.run_count.reshape(pairs)[flat]  # [P]
        k = int(counts.max()) if len(counts) else 0
        # Row gathers by np.take (a fancy index with a slice goes through numpy's general indexing:
        # ~3x), and the exclusive cumsum over the few run columns one column at a time (cumsum
        # along a short inner axis loops per row: ~10x)
        run_start = np.ascontiguousarray(np.take(buf.run_start.reshape(pairs, -1), flat, axis=0)[:, :k])
        run_len = np.ascontiguousarray(np.take(buf.run_len.reshape(pairs, -1), flat, axis=0)[:, :k])  # [P, K]
        before = np.zeros_like(run_len)  # [P, K] blocks of the pair before each run
        for c in range(1, k):
            np.add(before[:, c - 1], run_len[:, c - 1], out=before[:, c])
        short = buf.row_blocks[rows] - filled  # [B] blocks of each row not streamed in
        if bool(((short == 0) | (short == 1)).all()):
            # (decodes) a pair streams every block it holds but, when its row starts a block, the
            # new last one: its runs whole, the last one a block shorter (what the cut below gives,
            # as a pair's runs sum to its row's blocks)
            take = run_len.copy()
            cut = np.flatnonzero(short[pb])  # [P'] pairs of the rows starting a block (runs > 0)
            take.reshape(-1)[cut * k + counts[cut] - 1] -= 1
        else:
            take = filled[pb][:, None] - before  # [P, K] (np.clip's wrappers cost more than the work)
            np.minimum(np.maximum(take, 0, out=take), run_len, out=take)
        # The runs that stream something, as flat indices into [P, K] found once (four boolean
        # selections recomputed the mask's nonzeros each, and broadcast the layers to [P, K]).
        at = np.flatnonzero(take > 0)  # [R]
        run_pair = at // k if k else at  # [R] the pair of each run
        load = np.empty((len(at), 3), dtype=np.int64)  # [R, 3]
        load[:, 0] = run_start.reshape(-1)[at]
        load[:, 1] = offset[run_pair] + before.reshape(-1)[at]
        load[:, 2] = take.reshape(-1)[at]
        load_layer = pl[run_pair]  # [R]
        # Copy-back pairs: blocks first_written .. used-1 of each pair.
        n_written = written[pb]  # [P]
        # (checked over the batch's rows first: [B] against [P]; a GPU row failing it sends the
        # check to the pairs)
        if bool((counts > 0).all()) and (
                bool((written == 1).all() and (first_written == buf.row_blocks[rows] - 1).all()) or bool(
                    (n_written == 1).all() and (first_written[pb] == buf.row_blocks[pr] - 1).all())):
            # Every pair writes its last block (decodes): its host id ends the pair's last run, in
            # the runs gathered above, not a gather of one id a page apart per pair from host_ids.
            pair_of = np.arange(len(pb))  # [W = P]
            j = first_written[pb]
            last = counts - 1
            at_last = pair_of * k + last  # [W] flat index of each pair's last run in [P, K]
            store_dst = run_start.reshape(-1)[at_last] + run_len.reshape(-1)[at_last] - 1  # [W]
        else:
            pair_of = np.repeat(np.arange(len(pb)), n_written)  # [W]
            j = first_written[pb][pair_of] + np.arange(len(pair_of)) - np.repeat(
                np.cumsum(n_written) - n_written, n_written)  # [W] block index inside its request
            store_dst = buf.host_ids.reshape(pairs, -1)[flat[pair_of], j].astype(np.int64)  # [W]
        store_src = offset[pair_of] + j  # [W]
        # Runs do not depend on the range's base (it shifts a layer's sources alike): built once here.
        store_layer = pl[pair_of]
        if len(pair_of) == len(pb) and bool((used > 1).all() or (pair_used > 1).all()):
            # One block written per pair, and no row of one block: pair p + 1's source lies
            # used[p + 1] past pair p's, so no two pairs form a run and every pair is its own one
            # (what pair_runs finds, without its diff and stack passes over every pair).
            store = np.stack((store_src, store_dst, np.ones_like(store_src)), axis=1).astype(np.int64)
        else:
            store = pair_runs(store_src, store_dst, store_layer)  # [K', 3]
            store_layer = store_layer[np.cumsum(store[:, 2]) - store[:, 2]] if len(store) else store_layer
        load_cut = [*np.searchsorted(load_layer, layers, side="left").tolist(), len(load_layer)]
        store_cut = [*np.searchsorted(store_layer, layers, side="left").tolist(), len(store_layer)]
        layout: dict[bytes, tuple[int, np.ndarray]] = {}  # host-row set -> (blocks, offsets)
        for x, (layer, key) in enumerate(zip(pairs_of.layers, pairs_of.keys, strict=True)):
            if key not in layout:  # layers with the same host rows share one layout (half-host: all)
                a, b = first_pair[x], first_pair[x] + per_layer[x]
                offsets = np.zeros(len(rows), dtype=np.int64)
                offsets[pb[a:b]] = offset[a:b]
                layout[key] = (int(pair_used[a:b].sum()), offsets)
            blocks, offsets = layout[key]
            self._host[layer] = _HostLayer(key, blocks, offsets, load[load_cut[x]:load_cut[x + 1]],
                                           store[store_cut[x]:store_cut[x + 1]])
        # Bytes per request: every host-read layer streams its filled blocks in and writes back.
        host_layers = pairs_of.per_row  # [B] host-read layers of each row
        self._loaded_blocks = host_layers * filled  # [B]
        self._stored_blocks = host_layers * written  # [B]
        self._last_host_layer = pairs_of.layers[-1]
        self._all_rows = np.ones(len(rows), dtype=np.bool_).tobytes()  # the key of "every row"
        self._used = used
        self._used_key = used.tobytes()

    def _prebuild(self) -> None:
        """Tables and slots of every layer that all requests read in their own GPU blocks, at once."""
        layers = [i for i in range(self.num_layers) if i not in self._host]
        if not layers:
            return
        rows = self._rows_all  # [L, B, M]
        buf = self.buffer
        if self._decodes and bool((self._tok_block_np == buf.row_blocks[self._row_index] - 1).all()):
            # Every token is a decode writing its row's last block: the slots are the buffer's
            # tails (a view for a steady batch), not a gather of one id a page apart per (layer, row).
            steady = self._steady
            if steady is not None and len(layers) == self.num_layers:
                # A steady all-GPU decode batch: the previous step's views, still the buffer's.
                self._prebuilt = steady.decode_layers()
                return
            tails = buf.tail[:, :len(self.tables)] if buf.in_order else buf.tail[:, self._row_index_t]
            if len(layers) < self.num_layers:
                tails = tails[torch.tensor(layers, device=self.device)]  # [L', B]
            slots = tails
        elif len(layers) < self.num_layers:
            # The slots of the GPU-read layers in one gather, their tables as views: selecting the
            # layers first would copy every row of them.
            which = torch.tensor(layers, device=self.device)[:, None]  # [L', 1]
            slots = rows[which, self._tok_row[None, :], self._tok_block[None, :]]  # [L', T]
        else:
            slots = rows[:, self._tok_row, self._tok_block]  # [L, T]
        tables = rows.unbind(0)  # L views in one call
        self._prebuilt = dict(zip(layers, zip([tables[i] for i in layers], slots.unbind(0), strict=True),
                                  strict=True))

    def _prefetch(self, layer: int) -> None:
        """Take layer ``layer``'s staging range and stream its host KV in (one copy call)."""
        host = self._host.get(layer)
        if host is None:
            return
        host.base = self.manager.staging.take(host.blocks, side=layer % 2)
        if len(host.load):
            runs = host.load.copy()
            runs[:, 1] += host.base
            host.handle = self.copy.copy_runs(self.kv.host, self.kv.gpu, runs)

    def begin_layer(self, layer: int) -> tuple[torch.Tensor, AttentionMetadata]:
        if layer == 0:
            self._prefetch(0)
        if layer + 1 < self.num_layers:
            self._prefetch(layer + 1)  # overlaps this layer's compute
        host = self._host.get(layer)
        if host is not None and host.handle is not None:
            self._wait(host.handle)
        for table, loading in self._loading:
            lb = table.layers[loading]
            if loading == layer and lb.pending is not None:  # a promotion in flight: wait for it
                self._wait(lb.pending)
        if host is None:
            block_table, slot_blocks = self._prebuilt[layer]
        else:
            block_table, slot_blocks = self._host_table(layer, host)
        if self.fresh:
            meta = AttentionMetadata(is_prefill=True, slot_blocks=slot_blocks, slot_offsets=self.offsets,
                                     seq_lens=self.lens, cu_seqlens=self.cu_seqlens)
        else:
            meta = AttentionMetadata(
                is_prefill=False, slot_blocks=slot_blocks, slot_offsets=self.offsets, seq_lens=self.lens,
                cu_seqlens=self.cu_seqlens, block_table=block_table, context_lens=self.context_lens,
                max_context=self.max_context, context_list=self.ends)
        return self.kv.compute, meta

    def _host_table(self, layer: int, host: _HostLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """Block table [B, M] and slots [T] of a host-read layer: the staging ids of its host rows
        (each row's blocks contiguous from ``base + offsets[i]``) over the GPU rows' own ids.

        The staging part depends only on the layout (which rows, their offsets and block counts, the
        range's base), so it is cached in the buffer and reused by every layer and step that has the
        same layout: a steady half-host batch builds it once per block boundary."""
        key = (host.key, host.base, self.max_blocks, host.offsets.tobytes(), self._used_key)
        staged = self._staged(key, host)
        if host.key == self._all_rows:
            slots = self._staged_slots.get(key)
            if slots is None:  # this step's tokens in staging: row i's block j is base + offsets[i] + j
                slots = self._staged_slots[key] = torch.from_numpy(
                    (host.base + host.offsets[self._tok_row_np] + self._tok_block_np).astype(np.int32)
                ).to(self.device)  # [T], what the table holds there, without a gather from it
            return staged, slots
        block_table = self._rows_all[layer] + staged  # the host rows of _rows_all hold 0
        return block_table, block_table[self._tok_row, self._tok_block]

    def _staged(self, key: tuple[object, ...], host: _HostLayer) -> torch.Tensor:
        cache = self.buffer.staged_tables
        table = cache.get(key)
        if table is not None:
            return table
        # In numpy int32 (the torch version took five int64 ops: 5x the time).
        blocks = self._used if host.key == self._all_rows else np.where(  # [B] 0: a GPU row
            np.frombuffer(host.key, dtype=np.bool_), self._used, 0)
        m = self.max_blocks
        j = np.arange(m, dtype=np.int32)  # [M]
        rel = j[None, :] + (host.offsets + host.base).astype(np.int32)[:, None]  # [B, M]
        pad = m - blocks  # [B] entries past each row's blocks: 0 there (a GPU row: all of it)
        n_pad = int(pad.sum())
        if n_pad * 8 < rel.size:  # rows of about the same length: zero the few tails by index
            tail_begin = np.arange(len(pad)) * m + blocks  # [B] flat index of each row's first pad
            flat = np.repeat(tail_begin - (np.cumsum(pad) - pad), pad) + np.arange(n_pad)  # [n_pad]
            rel.reshape(-1)[flat] = 0
        else:  # (a pass of the mask over the whole table)
            np.multiply(rel, j[None, :] < blocks[:, None], out=rel)
        table = torch.from_numpy(rel).to(self.device)  # [B, M] int32
        while len(cache) >= 8:  # layouts of older steps: a block boundary or a batch change moved on
            # The oldest one goes (dicts keep insertion order), not all of them: its memory is reused
            # by the next table, where freeing eight at once handed it back to the OS and every new
            # table paid its page faults again (at batch 256: 1 MB a table, ~5x the build).
            del cache[next(iter(cache))]
        cache[key] = table
        return table

    def end_layer(self, layer: int) -> None:
        """Copy the blocks each host-read segment wrote back to the request's host blocks."""
        host = self._host.get(layer)
        if host is None:
            return
        runs = host.store.copy()
        runs[:, 0] += host.base
        handle = self.copy.copy_runs(self.kv.gpu, self.kv.host, runs)
        self.manager.staging.release_after(host.base, handle)
        host.base = -1
        self._last_store = handle
        if layer == self._last_host_layer:
            self._settle()

    def _settle(self) -> None:
        """After the last write-back: its host blocks stay held until it is done (copies run in
        order, so the step's last store covers all its earlier ones), and the bytes are counted."""
        assert self._last_store is not None
        for i in np.flatnonzero(self._loaded_blocks + self._stored_blocks).tolist():
            self.manager.set_store(self.tables[i], self._last_store)
        self.stats.bytes_loaded += int(self._loaded_blocks.sum()) * self.block_bytes
        self.stats.bytes_offloaded += int(self._stored_blocks.sum()) * self.block_bytes

    @property
    def copies_staged(self) -> bool:
        """Some layer of the step goes through staging (else ``copied_bytes`` is all zeros)."""
        return bool(self._host)

    def copied_bytes(self) -> tuple[list[int], list[int]]:
        """Bytes each request of the batch streamed in and wrote back through staging (step order)."""
        return ((self._loaded_blocks * self.block_bytes).tolist(),
                (self._stored_blocks * self.block_bytes).tolist())

    def abandon(self) -> None:
        """Return the staging ranges this step still holds (the forward failed midway)."""
        for host in self._host.values():
            if host.base < 0:
                continue
            if host.handle is not None:
                host.handle.wait()  # a load may still be writing into these blocks
            self.manager.staging.release(host.base)
            host.base = -1
        if self._last_store is not None:
            for i in np.flatnonzero(self._loaded_blocks + self._stored_blocks).tolist():
                self.manager.set_store(self.tables[i], self._last_store)
