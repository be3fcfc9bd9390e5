"""The persistent block-table buffer (GPU ids, host ids and their runs) equals tables rebuilt from
scratch after any mix of admission, growth, swap-out, promotion, preemption (release and
re-admission under the same id) and finish, and writes only what changed; the KV manager's tracked
staging demand stays equal to a recount."""

from __future__ import annotations

import random

import pytest
import torch

from common.types import KVGeometry, Placement, Residency, Tier
from worker_svc.kv.block_table import LayerBlockTable
from worker_svc.kv.manager import KVCacheManager
from worker_svc.kv.offload import CopyEngine
from worker_svc.kv.table_buffer import BlockTableBuffer

LAYERS = 4
GEOMETRY = KVGeometry(LAYERS, 1, 2, 4, 4)


def rebuilt_runs(ids: list[int]) -> list[tuple[int, int]]:
    """(first id, length) of each run of consecutive ids, by a plain loop."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def rebuilt(table: LayerBlockTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ids attention reads [L, n] and host-read flags [L], from the table's lists."""
    n = table.blocks_per_layer
    ids = torch.tensor([lb.gpu_blocks[:n] if lb.reads_gpu_blocks else [0] * n for lb in table.layers],
                       dtype=torch.int64).reshape(LAYERS, n)
    return ids, torch.tensor([not lb.reads_gpu_blocks for lb in table.layers])


def assert_buffer_matches(buffer: BlockTableBuffer, mgr: KVCacheManager, batch: list[str]) -> None:
    tables = [mgr.tables[r] for r in batch]
    rows = buffer.rows_for(tables, mgr.tables)
    assert len(set(rows.tolist())) == len(rows)  # one row per request
    assert buffer.in_order == (rows.tolist() == list(range(len(rows))))
    for table, row in zip(tables, rows.tolist(), strict=True):
        ids, host = rebuilt(table)
        n = table.blocks_per_layer
        assert torch.equal(buffer.ids[:, row, :n].long(), ids), table.request_id
        assert not buffer.ids[:, row, n:].any()  # padded with block 0 beyond its blocks
        assert int(buffer.row_blocks[row]) == n
        assert torch.equal(buffer.tail[:, row].long(), ids[:, n - 1] if n else torch.zeros(LAYERS).long())
        assert torch.equal(buffer.host_read[:, row], host)
        for layer, lb in enumerate(table.layers):  # host ids and their runs: what staging copies use
            host_ids = lb.host_blocks[:n] if not lb.reads_gpu_blocks else []
            assert buffer.host_ids[layer, row, :len(host_ids)].tolist() == host_ids
            assert not buffer.host_ids[layer, row, len(host_ids):].any()
            c = int(buffer.run_count[layer, row])
            got = list(zip(buffer.run_start[layer, row, :c].tolist(), buffer.run_len[layer, row, :c].tolist(),
                           strict=True))
            assert got == rebuilt_runs(host_ids), (table.request_id, layer)


@pytest.mark.parametrize("seed", range(6))
def test_buffer_equals_rebuild_after_random_sequences(seed: int) -> None:
    rnd = random.Random(seed)
    mgr = KVCacheManager(GEOMETRY, gpu_blocks=60, host_blocks=60, staging_blocks=40)
    gpu = torch.zeros(100, 2, 4, 1, 2)
    host = torch.zeros(60, 2, 4, 1, 2)
    copy = CopyEngine()
    buffer = BlockTableBuffer(LAYERS, rows=2, blocks=2)  # small, so rows and blocks both grow
    tokens: dict[str, int] = {}
    multi_run = False  # some host layer's ids were not one run (fragmented pool, interleaved growth)
    for _ in range(300):
        op = rnd.choice(["admit", "grow", "grow", "grow", "swap", "promote", "finish", "readmit"])
        live = list(mgr.tables)
        if op == "admit" or not live:
            rid = f"r{rnd.randrange(12)}"
            if rid not in mgr.tables:
                n = rnd.randint(1, 9)
                letters = "".join(rnd.choice("GH") for _ in range(LAYERS))
                if mgr.allocate(rid, n, Placement.from_letters(letters, LAYERS)) is not None:
                    tokens[rid] = n
                    mgr.tables[rid].num_tokens = n
        elif op == "grow":
            rid = rnd.choice(live)
            to = tokens[rid] + rnd.randint(1, 5)
            if mgr.grow(mgr.tables[rid], to):
                tokens[rid] = to
                mgr.tables[rid].num_tokens = to
        elif op == "swap":
            table = mgr.tables[rnd.choice(live)]
            layers = mgr.swap_candidates(table)
            if layers:
                mgr.swap_out(table, layers[0], copy, gpu, host)
        elif op == "promote":
            options = mgr.promotable()
            if options:
                table, layer = rnd.choice(options)
                mgr.start_promotion(table, layer, copy, gpu, host)
            mgr.poll()
        elif op == "finish":
            mgr.release(rnd.choice(live))
        else:  # recompute preemption: released, then admitted again under the same id
            rid = rnd.choice(live)
            mgr.release(rid)
            if mgr.allocate(rid, tokens[rid], Placement.all_gpu(LAYERS)) is not None:
                mgr.tables[rid].num_tokens = tokens[rid]
        assert mgr._staging_demand() == mgr.derived_staging_demand()  # tracked counts stay exact
        batch = [r for r in mgr.tables if rnd.random() < 0.7]
        if batch:
            assert_buffer_matches(buffer, mgr, batch)
            multi_run |= bool((buffer.run_count > 1).any())
    assert buffer.ids.shape[1] > 2 and buffer.ids.shape[2] > 2
    assert multi_run


def test_growth_writes_only_the_new_tail_and_rows_are_reused() -> None:
    mgr = KVCacheManager(GEOMETRY, gpu_blocks=40, host_blocks=40, staging_blocks=20)
    buffer = BlockTableBuffer(LAYERS, rows=1, blocks=8)
    table = mgr.allocate("a", 8, Placement.from_letters("GHGG", LAYERS))
    assert table is not None
    row = int(buffer.rows_for([table], mgr.tables)[0])
    buffer.ids[0, row, 0] = -7  # a marker: a tail write must leave earlier blocks alone
    assert mgr.grow(table, 9)
    buffer.rows_for([table], mgr.tables)
    assert buffer.ids[0, row, 0] == -7 and buffer.ids[0, row, 2] == table.layers[0].gpu_blocks[2]
    assert table.layers[1].home is Tier.HOST and table.layers[1].residency is Residency.HOST
    mgr.release("a")
    other = mgr.allocate("b", 4, Placement.all_gpu(LAYERS))
    assert other is not None
    assert int(buffer.rows_for([other], mgr.tables)[0]) == row  # the finished request's row, reclaimed
    assert buffer.ids.shape[1] == 1
    assert_buffer_matches(buffer, mgr, ["b"])


def test_one_block_growth_takes_what_the_general_path_takes() -> None:
    """``grow`` by one block (its own fast path) takes the same ids, and refuses the same growth
    (a full tier, the staging rule), as the general path does."""
    rnd = random.Random(3)
    fast = KVCacheManager(GEOMETRY, gpu_blocks=50, host_blocks=40, staging_blocks=14)
    general = KVCacheManager(GEOMETRY, gpu_blocks=50, host_blocks=40, staging_blocks=14)
    bs = GEOMETRY.block_size
    general._grow_one = lambda t: general._grow_by(  # type: ignore[method-assign]
        t, general.growth_demand(t, (t.blocks_per_layer + 1) * bs))
    refused = grown = 0
    for step in range(400):
        live = list(fast.tables)
        if not live or rnd.random() < 0.15:
            rid, n = f"r{step}", rnd.randint(1, 6)
            placement = Placement.from_letters("".join(rnd.choice("GH") for _ in range(LAYERS)), LAYERS)
            a, b = fast.allocate(rid, n, placement), general.allocate(rid, n, placement)
            assert (a is None) == (b is None)
        elif rnd.random() < 0.1:
            rid = rnd.choice(live)
            fast.release(rid)
            general.release(rid)
        else:
            rid = rnd.choice(live)
            to = fast.tables[rid].blocks_per_layer * bs + 1  # one block more
            ok = fast.grow(fast.tables[rid], to)
            assert ok == general.grow(general.tables[rid], to)
            grown += ok
            refused += not ok
        for rid, table in fast.tables.items():
            other = general.tables[rid]
            assert table.blocks_per_layer == other.blocks_per_layer
            assert [(lb.gpu_blocks, lb.host_blocks) for lb in table.layers] == [
                (lb.gpu_blocks, lb.host_blocks) for lb in other.layers]
        assert fast.usage() == general.usage()
        assert fast._staging_demand() == general._staging_demand() == fast.derived_staging_demand()
    assert grown and refused


def test_in_place_buffer_growth_matches_tables() -> None:
    """Host layers read in place: a row's ids are its GPU ids and its host ids shifted by the
    offset, after growth by one block (written for all grown rows at once) and by several."""
    mgr = KVCacheManager(GEOMETRY, gpu_blocks=400, host_blocks=400, staging_blocks=0,
                         host_in_place=True)
    off = 1000
    buffer = BlockTableBuffer(LAYERS, rows=1, blocks=1, host_offset=off)
    rnd = random.Random(5)
    for i in range(4):
        letters = "".join(rnd.choice("GH") for _ in range(LAYERS))
        assert mgr.allocate(f"r{i}", rnd.randint(1, 6), Placement.from_letters(letters, LAYERS)) is not None
    for _ in range(12):
        for table in mgr.tables.values():
            assert mgr.grow(table, table.blocks_per_layer * GEOMETRY.block_size + rnd.choice([1, 1, 5]))
        tables = list(mgr.tables.values())
        rows = buffer.rows_for(tables, mgr.tables).tolist()
        for table, row in zip(tables, rows, strict=True):
            n = table.blocks_per_layer
            want = [lb.gpu_blocks[:n] if lb.home is Tier.GPU else [off + h for h in lb.host_blocks[:n]]
                    for lb in table.layers]
            assert buffer.ids[:, row, :n].tolist() == want
            assert not buffer.host_read[:, row].any()


@pytest.mark.parametrize("seed", range(4))
def test_a_steady_batch_synced_in_one_pass_equals_rebuild(seed: int) -> None:
    """The same batch step after step (``rows_for``'s fast path: only tables whose version or block
    count moved are rewritten), through growth, swap-outs and promotions, matches a rebuild, and
    keeps its rows."""
    rnd = random.Random(seed)
    mgr = KVCacheManager(GEOMETRY, gpu_blocks=80, host_blocks=80, staging_blocks=60)
    gpu = torch.zeros(140, 2, 4, 1, 2)
    host = torch.zeros(80, 2, 4, 1, 2)
    copy = CopyEngine()
    buffer = BlockTableBuffer(LAYERS, rows=2, blocks=2)
    tokens = {}
    for i in range(4):
        letters = "".join(rnd.choice("GH") for _ in range(LAYERS))
        assert mgr.allocate(f"r{i}", 3 + i, Placement.from_letters(letters, LAYERS)) is not None
        tokens[f"r{i}"] = 3 + i
    batch = list(mgr.tables)
    assert_buffer_matches(buffer, mgr, batch)
    first = buffer.rows_for([mgr.tables[r] for r in batch], mgr.tables).tolist()
    moved = 0
    for _ in range(60):
        op = rnd.choice(["grow", "grow", "grow", "swap", "promote", "none"])
        rid = rnd.choice(batch)
        table = mgr.tables[rid]
        if op == "grow":
            to = tokens[rid] + rnd.choice([1, 1, 1, 6])  # mostly one block at a time
            if mgr.grow(table, to):
                tokens[rid] = table.num_tokens = to
        elif op == "swap":
            layers = mgr.swap_candidates(table)
            if layers:
                mgr.swap_out(table, layers[0], copy, gpu, host)
                moved += 1
        elif op == "promote":
            options = mgr.promotable()
            if options:
                mgr.start_promotion(*rnd.choice(options), copy, gpu, host)
                moved += 1
            mgr.poll()
        assert_buffer_matches(buffer, mgr, batch)
        assert buffer.rows_for([mgr.tables[r] for r in batch], mgr.tables).tolist() == first
    assert moved


def test_layer_split_follows_swaps_and_promotions() -> None:
    """A table's kept layer split (what one-block growth and the buffer's growth read) is rebuilt
    when a swap-out or a promotion moves a layer, so the next block lands in the layer's new tier."""
    mgr = KVCacheManager(GEOMETRY, gpu_blocks=60, host_blocks=60, staging_blocks=40)
    gpu, host, copy = torch.zeros(100, 2, 4, 1, 2), torch.zeros(60, 2, 4, 1, 2), CopyEngine()
    table = mgr.allocate("r", 5, Placement.from_letters("GHGG", LAYERS))
    assert table is not None
    table.num_tokens = 5

    def split() -> tuple[tuple[int, ...], ...]:
        reads = [lb.reads_gpu_blocks for lb in table.layers]
        return (tuple(i for i, r in enumerate(reads) if r), tuple(i for i, r in enumerate(reads) if not r),
                tuple(int(r) for r in reads), tuple(int(not r) for r in reads))

    def grow_one_block() -> None:
        hosts_before = [len(lb.host_blocks) for lb in table.layers]
        assert mgr.grow(table, table.blocks_per_layer * 4 + 1)
        for layer, lb in enumerate(table.layers):  # the new block is in the tier the layer reads
            grew_host = len(lb.host_blocks) > hosts_before[layer]
            assert grew_host == (not lb.reads_gpu_blocks), layer
        assert mgr._staging_demand() == mgr.derived_staging_demand()

    assert table.read_split == split() == ((0, 2, 3), (1,), (1, 0, 1, 1), (0, 1, 0, 0))
    grow_one_block()
    mgr.swap_out(table, 3, copy, gpu, host)
    assert table.read_split == split() == ((0, 2), (1, 3), (1, 0, 1, 0), (0, 1, 0, 1))
    grow_one_block()
    mgr.start_promotion(table, 1, copy, gpu, host)  # loading: read (and grown) in its GPU target
    assert table.read_split == split() == ((0, 1, 2), (3,), (1, 1, 1, 0), (0, 0, 0, 1))
    grow_one_block()
    mgr.poll()
    assert table.layers[1].home is Tier.GPU and table.read_split == split()
    grow_one_block()
