"""A step's host-layer plan and staging tables are exactly what the general construction gives,
array for array, on the shortcuts a batch-256 decode step takes: write-backs of decodes without
``pair_runs`` (rows of more than one block), stream-in runs by one flat index, and staging tables
that zero only their rows' tails (every row host-read, about the same length). The other steps of
the same random runs (chunks, rows of one block, GPU rows beside host rows) take the general paths,
checked the same way."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from common.types import KVGeometry, Placement
from worker_svc.kv import step_access
from worker_svc.kv.block_table import LayerBlockTable
from worker_svc.kv.kv_cache import KVCache
from worker_svc.kv.manager import KVCacheManager
from worker_svc.kv.offload import CopyEngine, runs_array
from worker_svc.kv.step_access import CopyStats, StepAccess, pair_runs
from worker_svc.kv.table_buffer import BlockTableBuffer

LAYERS, BS = 4, 4


def expected_load(tables: list[LayerBlockTable], starts: list[int], rows: list[int], layer: int,
                  offsets: np.ndarray) -> np.ndarray:
    """Stream-in runs of ``layer``: per host row in batch order, the maximal runs of its filled host
    ids, to consecutive staging offsets (what the buffer's runs cut at the filled blocks are)."""
    parts = [runs_array(tables[i].layers[layer].host_blocks[:-(-starts[i] // BS)],
                        range(int(offsets[i]), int(offsets[i]) - (-starts[i] // BS))) for i in rows]
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


def expected_store(tables: list[LayerBlockTable], starts: list[int], ends: list[int], rows: list[int],
                   layer: int, offsets: np.ndarray) -> np.ndarray:
    """Write-back runs of ``layer``: ``pair_runs`` over every (staging offset, host id) written."""
    src, dst = [], []
    for i in rows:
        for j in range(starts[i] // BS, -(-ends[i] // BS)):
            src.append(int(offsets[i]) + j)
            dst.append(tables[i].layers[layer].host_blocks[j])
    s, d = np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
    return pair_runs(s, d, np.zeros(len(s), dtype=np.int64))


@pytest.mark.parametrize("seed", range(3))
def test_plan_and_staging_tables_equal_the_general_construction(seed: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    geo = KVGeometry(LAYERS, 1, 2, BS, 4)
    mgr = KVCacheManager(geo, gpu_blocks=400, host_blocks=600, staging_blocks=400)
    kv = KVCache(geo, 400, 400, 600, torch.device("cpu"), torch.float32)
    buffer = BlockTableBuffer(LAYERS, rows=2, blocks=2)
    calls = {"pair_runs": 0}
    real_pair_runs = step_access.pair_runs

    def counting(*args: np.ndarray) -> np.ndarray:
        calls["pair_runs"] += 1
        return real_pair_runs(*args)

    monkeypatch.setattr(step_access, "pair_runs", counting)
    seen = {"fast_store": 0, "general_store": 0, "tail_zero": 0, "mask": 0, "whole_runs": 0, "cut_runs": 0}
    for step in range(60):
        if len(mgr.tables) < 8:  # mostly half-host rows; now and then a GPU row or a one-block one
            letters = "HGHG" if rnd.random() < 0.8 else "GGHG"
            n = rnd.randint(13, 17) if rnd.random() < 0.9 else rnd.randint(1, 3)
            mgr.allocate(f"s{step}", n, Placement.from_letters(letters, LAYERS))
            mgr.tables[f"s{step}"].num_tokens = n
        if rnd.random() < 0.1 and len(mgr.tables) > 3:
            mgr.release(rnd.choice(list(mgr.tables)))
        tables = list(mgr.tables.values())
        chunk = rnd.random() < 0.2
        starts, lens = [], []
        for t in tables:  # a decode of the next token (grown when it crosses a block), or a chunk
            n = t.num_tokens
            length = rnd.randint(1, 9) if chunk else 1
            if not mgr.grow(t, n + length):
                length = t.blocks_per_layer * BS - n
            starts.append(n)
            lens.append(length)
        keep = [i for i, n in enumerate(lens) if n > 0]
        tables = [tables[i] for i in keep]
        starts, lens = [starts[i] for i in keep], [lens[i] for i in keep]
        if not tables:
            continue
        ends = [s + n for s, n in zip(starts, lens, strict=True)]
        before = calls["pair_runs"]
        access = StepAccess(tables, starts, lens, kv, mgr, CopyEngine(), CopyStats(), buffer)
        host_pairs = [(i, layer) for layer in range(LAYERS) for i, t in enumerate(tables)
                      if not t.layers[layer].reads_gpu_blocks]
        used_min = min(-(-ends[i] // BS) for i, _ in host_pairs) if host_pairs else 0
        if host_pairs:  # stream-in runs taken whole (but a new last block) or cut at the filled blocks
            whole = all(t.blocks_per_layer - -(-s // BS) in (0, 1)
                        for t, s in zip(tables, starts, strict=True))
            seen["whole_runs" if whole else "cut_runs"] += 1
        if host_pairs and not chunk:
            key = "fast_store" if used_min > 1 and calls["pair_runs"] == before else "general_store"
            seen[key] += 1
            assert (calls["pair_runs"] == before) == (used_min > 1)  # the shortcut, exactly when it holds
        for layer in range(LAYERS):
            host = access._host.get(layer)
            rows = [i for i, t in enumerate(tables) if not t.layers[layer].reads_gpu_blocks]
            if host is None:
                assert not rows
                continue
            assert np.array_equal(host.load, expected_load(tables, starts, rows, layer, host.offsets))
            assert host.load.dtype == np.int64 and host.load.flags.c_contiguous
            assert np.array_equal(host.store, expected_store(tables, starts, ends, rows, layer, host.offsets))
            assert host.store.dtype == np.int64
            # the staging table at some base: every row's blocks from base + offset, 0 past them and
            # in GPU rows (the mask construction the tail-zeroing shortcut replaces)
            host.base = rnd.randint(0, 50)
            key = (host.key, host.base, access.max_blocks, host.offsets.tobytes(), access._used_key)
            table = access._staged(key, host)
            m = access.max_blocks
            blocks = np.where(np.frombuffer(host.key, dtype=np.bool_), access._used, 0)
            j = np.arange(m, dtype=np.int32)
            want = (j[None, :] + (host.offsets + host.base).astype(np.int32)[:, None]) * (
                j[None, :] < blocks[:, None])
            assert table.dtype == torch.int32 and torch.equal(table, torch.from_numpy(want.astype(np.int32)))
            seen["tail_zero" if int((m - blocks).sum()) * 8 < blocks.size * m else "mask"] += 1
            host.base = -1
        buffer.staged_tables.clear()
        for t, e in zip(tables, ends, strict=True):
            t.num_tokens = e
    assert all(seen.values()), seen  # every shortcut and every general path ran


def test_staging_table_cache_drops_only_its_oldest_layout() -> None:
    """Past eight layouts the cache drops the oldest one (whose memory the next table reuses), not
    every entry (which returned the memory to the OS, and every later table paid its page faults)."""
    geo = KVGeometry(LAYERS, 1, 2, BS, 4)
    mgr = KVCacheManager(geo, gpu_blocks=100, host_blocks=100, staging_blocks=100)
    kv = KVCache(geo, 100, 100, 100, torch.device("cpu"), torch.float32)
    buffer = BlockTableBuffer(LAYERS)
    tables = []
    for i in range(3):
        table = mgr.allocate(f"r{i}", 9, Placement.from_letters("HGHG", LAYERS))
        assert table is not None
        tables.append(table)
    access = StepAccess(tables, [9] * 3, [1] * 3, kv, mgr, CopyEngine(), CopyStats(), buffer)
    host = access._host[0]
    keys = []
    for base in range(12):
        host.base = base
        keys.append((host.key, base, access.max_blocks, host.offsets.tobytes(), access._used_key))
        table = access._staged(keys[-1], host)
        assert int(table[0, 0]) == base
    assert list(buffer.staged_tables) == keys[-8:]
