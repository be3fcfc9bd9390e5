"""Both ways a step builds host-read layers' block tables (every row host-read: the cached staging
table as is; some rows GPU-read: added to their own ids) and both ways it takes the persistent
tables (a view of rows in order, a gather otherwise) give tokens identical to transformers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from common.types import KVGeometry, Placement
from tests.test_engine_reference import (
    Job,
    assert_all_free,
    assert_matches,
    hf_generate,
    make_engine,
    prompt_of,
    run_engine,
)
from worker_svc.kv import step_access
from worker_svc.kv.kv_cache import KVCache
from worker_svc.kv.manager import KVCacheManager
from worker_svc.kv.offload import CopyEngine, expand_runs
from worker_svc.kv.step_access import CopyStats, StepAccess
from worker_svc.kv.table_buffer import BlockTableBuffer

LAYERS, BLOCK_SIZE = 4, 4


def _random_pools(seed: int, gpu_blocks: int
                  ) -> tuple[random.Random, KVCacheManager, KVCache, BlockTableBuffer]:
    """A seeded generator, a 4-layer manager with its KV tensors (300 host and 200 staging
    blocks), and a tiny table buffer that has to grow."""
    geo = KVGeometry(LAYERS, 1, 2, BLOCK_SIZE, 4)
    mgr = KVCacheManager(geo, gpu_blocks=gpu_blocks, host_blocks=300, staging_blocks=200)
    kv = KVCache(geo, gpu_blocks, 200, 300, torch.device("cpu"), torch.float32)
    return random.Random(seed), mgr, kv, BlockTableBuffer(LAYERS, rows=2, blocks=2)


@pytest.mark.parametrize("mixed", [False, True])
def test_staging_tables_built_either_way_match_transformers(hf_and_folder: tuple[Any, Path],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            mixed: bool) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, host_access="stream", block_size=4, gpu_blocks=200, host_blocks=200,
                         max_promotions_per_step=0)
    lengths, news, arrivals = [9, 5, 14, 7, 3], [6, 9, 4, 8, 7], [0, 0, 1, 2, 6]
    prompts = [prompt_of(n, 70 + i) for i, n in enumerate(lengths)]
    # Staggered arrivals and finishes: rows are reused out of order, so both table paths run.
    # mixed: layers 0 and 1 have GPU-read rows beside host-read ones, layer 2 is host-read by all.
    jobs = {f"r{i}": Job(prompts[i], news[i], arrive_step=arrivals[i],
                         placement="GHHG" if i % 2 and mixed else "HGHG") for i in range(5)}
    seen: list[bool] = []
    rows_for = BlockTableBuffer.rows_for

    def recording(self: BlockTableBuffer, *args: Any) -> Any:
        out = rows_for(self, *args)
        seen.append(self.in_order)
        return out

    every_row: list[bool] = []  # per host-read layer built: all batch rows host-read?
    host_table = step_access.StepAccess._host_table

    def recording_table(self: step_access.StepAccess, layer: int, host: Any) -> Any:
        every_row.append(host.key == self._all_rows)
        return host_table(self, layer, host)

    monkeypatch.setattr(BlockTableBuffer, "rows_for", recording)
    monkeypatch.setattr(step_access.StepAccess, "_host_table", recording_table)
    got = run_engine(engine, jobs)
    assert True in seen and False in seen  # both the view and the gather were used
    assert set(every_row) == ({True, False} if mixed else {True})
    for i in range(5):
        assert_matches(got[f"r{i}"], hf_generate(model, prompts[i], news[i]))
    assert_all_free(engine)


def test_step_copy_runs_and_tables_equal_a_per_block_rebuild() -> None:
    """A step's stream-in and write-back runs, expanded, and its host layers' block tables equal
    lists built block by block from the tables, for random batches of decodes and chunks."""
    import itertools

    import numpy as np

    layers, bs = LAYERS, BLOCK_SIZE
    rnd, mgr, kv, buffer = _random_pools(7, gpu_blocks=300)
    checked = 0
    for step in range(40):
        if len(mgr.tables) < 6:  # admit, then grow some so host ids fragment into several runs
            rid = f"s{step}"
            letters = "".join(rnd.choice("GH") for _ in range(layers))
            mgr.allocate(rid, rnd.randint(1, 12), Placement.from_letters(letters, layers))
        for table in mgr.tables.values():
            table.num_tokens = table.blocks_per_layer * bs - rnd.randint(0, bs - 1)
            if rnd.random() < 0.5:
                mgr.grow(table, table.num_tokens + rnd.randint(1, 6))
        if rnd.random() < 0.2 and len(mgr.tables) > 2:
            mgr.release(rnd.choice(list(mgr.tables)))
        tables = [t for t in mgr.tables.values() if rnd.random() < 0.8]
        if not tables:
            continue
        rnd.shuffle(tables)
        starts = [rnd.randint(0, t.num_tokens - 1) for t in tables]
        lens = [rnd.randint(1, t.blocks_per_layer * bs - s) for t, s in zip(tables, starts, strict=True)]
        access = StepAccess(tables, starts, lens, kv, mgr, CopyEngine(), CopyStats(), buffer)
        for layer in range(layers):
            _, meta = access.begin_layer(layer)
            host = access._host.get(layer)
            rows = [i for i, t in enumerate(tables) if not t.layers[layer].reads_gpu_blocks]
            if host is None:
                assert not rows
                access.end_layer(layer)
                continue
            want_src, want_dst, store_src, store_dst = [], [], [], []
            # whole prompts from slot 0 attend without a table; the table is built the same way
            table = meta.block_table if meta.block_table is not None else access._host_table(layer, host)[0]
            expect_table = torch.zeros_like(table)
            for i in rows:
                t, s, e = tables[i], starts[i], starts[i] + lens[i]
                first = host.base + int(host.offsets[i])
                used, filled = -(-e // bs), -(-s // bs)
                want_src += t.layers[layer].host_blocks[:filled]
                want_dst += range(first, first + filled)
                store_src += [first + j for j in range(s // bs, used)]
                store_dst += [t.layers[layer].host_blocks[j] for j in range(s // bs, used)]
                expect_table[i, :used] = torch.arange(first, first + used)
            for i, t in enumerate(tables):
                if t.layers[layer].reads_gpu_blocks:  # its own blocks (held ones past its end too)
                    n = min(t.blocks_per_layer, expect_table.shape[1])
                    expect_table[i, :n] = torch.tensor(t.layers[layer].gpu_blocks[:n])
            runs = host.load.copy()
            runs[:, 1] += host.base
            src, dst = expand_runs(runs) if len(runs) else (torch.zeros(0), torch.zeros(0))
            assert src.tolist() == want_src and dst.tolist() == want_dst
            store = host.store.copy()
            store[:, 0] += host.base
            src, dst = expand_runs(store)
            assert src.tolist() == store_src and dst.tolist() == store_dst
            assert torch.equal(table, expect_table)
            # each token's slot block: its row's table entry at the token's block (built without a
            # gather when every row is host-read)
            want_slots = [int(expect_table[i, p // bs]) for i in range(len(tables))
                          for p in range(starts[i], starts[i] + lens[i])]
            assert meta.slot_blocks.tolist() == want_slots
            # staging ranges of all host rows are disjoint and inside the pool
            spans = sorted((host.base + int(host.offsets[i]), -(-(starts[i] + lens[i]) // bs)) for i in rows)
            assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))
            assert spans[-1][0] + spans[-1][1] <= mgr.staging.first_id + mgr.staging.num_blocks
            access.end_layer(layer)
            checked += 1
        assert np.array_equal(np.array(access.copied_bytes()[0]) > 0,
                              np.array([any(not lb.reads_gpu_blocks for lb in t.layers) and s > 0
                                        for t, s in zip(tables, starts, strict=True)]))
    assert checked > 40
    assert (buffer.run_count > 1).any()


def test_decode_slots_from_the_tails_equal_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU-read layers' slots and tables of a step: for decodes writing their last block they come
    from the buffer's tails, otherwise from a gather; either way they equal the tables' lists. And
    host-read layers' write-back runs (for such decodes taken from the pairs' last runs) equal the
    blocks listed one by one."""
    layers, bs = LAYERS, BLOCK_SIZE
    rnd, mgr, kv, buffer = _random_pools(11, gpu_blocks=400)
    tail_steps = gather_steps = checked = stored = 0
    for step in range(60):
        if len(mgr.tables) < 7:
            letters = "".join(rnd.choice("GGGH") for _ in range(layers))
            mgr.allocate(f"s{step}", rnd.randint(1, 12), Placement.from_letters(letters, layers))
        for table in mgr.tables.values():
            if rnd.random() < 0.4:
                mgr.grow(table, table.blocks_per_layer * bs + 1)  # one block more
        if rnd.random() < 0.15 and len(mgr.tables) > 2:
            mgr.release(rnd.choice(list(mgr.tables)))
        tables = [t for t in mgr.tables.values() if rnd.random() < 0.8] or list(mgr.tables.values())
        if rnd.random() < 0.5:
            rnd.shuffle(tables)  # rows out of batch order: the tails are gathered too
        # a decode in its last block (the common case), or now and then one earlier
        starts = [max(0, t.blocks_per_layer * bs - 1 - (rnd.random() < 0.1) * bs) for t in tables]
        access = StepAccess(tables, starts, [1] * len(tables), kv, mgr, CopyEngine(), CopyStats(), buffer)
        last = all(s // bs == t.blocks_per_layer - 1 for t, s in zip(tables, starts, strict=True))
        tail_steps += last
        gather_steps += not last
        for layer in range(layers):
            _, meta = access.begin_layer(layer)
            if layer not in access._host:  # every row reads this layer's own GPU blocks
                want = [t.layers[layer].gpu_blocks[s // bs] for t, s in zip(tables, starts, strict=True)]
                assert meta.slot_blocks.tolist() == want
                for i, t in enumerate(tables):
                    n = -(-(starts[i] + 1) // bs)
                    assert meta.block_table[i, :n].tolist() == t.layers[layer].gpu_blocks[:n]
                checked += last
            else:  # the write-back runs (from the pairs' last runs when every pair writes its last block)
                host = access._host[layer]
                rows = [i for i, t in enumerate(tables) if not t.layers[layer].reads_gpu_blocks]
                store = host.store.copy()
                src, dst = expand_runs(store)
                assert src.tolist() == [int(host.offsets[i]) + starts[i] // bs for i in rows]
                assert dst.tolist() == [tables[i].layers[layer].host_blocks[starts[i] // bs] for i in rows]
                stored += last
            access.end_layer(layer)
    assert tail_steps > 10 and gather_steps > 3 and checked > 5 and stored > 5
