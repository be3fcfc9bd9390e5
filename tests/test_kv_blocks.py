"""Block pools, copy coalescing, staging reuse and two-tier admission accounting, without a model."""

from __future__ import annotations

import torch

from common.types import KVGeometry, Placement, Residency, Tier
from worker_svc.kv.block_pool import BlockPool
from worker_svc.kv.manager import KVCacheManager
from worker_svc.kv.offload import CopyEngine, CopyRun, StagingPool, coalesce


def test_block_pool_no_room_is_none_and_ids_come_out_contiguous() -> None:
    pool = BlockPool(10, first_id=5)
    a = pool.allocate(4)
    assert a == [5, 6, 7, 8]
    assert pool.allocate(7) is None and pool.num_free == 6  # nothing taken on failure
    b = pool.allocate(6)
    assert b == [9, 10, 11, 12, 13, 14] and pool.num_free == 0
    pool.free(a)
    assert pool.allocate(4) == [5, 6, 7, 8]  # freed runs come back in ascending order


def test_coalesce_makes_one_copy_per_contiguous_run() -> None:
    assert coalesce([3, 4, 5, 9], [10, 11, 12, 0]) == [CopyRun(3, 10, 3), CopyRun(9, 0, 1)]
    src = torch.arange(6 * 2.0).view(6, 2)
    dst = torch.zeros(4, 2)
    CopyEngine().copy_blocks(src, [1, 2, 5], dst, [0, 1, 3])
    assert torch.equal(dst[0], src[1]) and torch.equal(dst[1], src[2]) and torch.equal(dst[3], src[5])
    assert torch.equal(dst[2], torch.zeros(2))


class ManualHandle:
    def __init__(self) -> None:
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def wait(self) -> None:
        self.finished = True

    def order_compute_after(self) -> None:
        assert self.finished


def test_staging_reuses_a_range_only_after_its_copy() -> None:
    staging = StagingPool(4, first_id=100)
    first = staging.take(3, side=0)
    assert first == 100
    handle = ManualHandle()
    staging.release_after(first, handle)
    assert staging.num_free == 1  # held while the copy runs
    second = staging.take(1, side=1)  # the other end of the pool: no wait
    assert second == 103 and not handle.finished
    third = staging.take(2, side=0)  # overlaps the first range: must wait for its copy
    assert handle.finished and third == 100
    staging.release(second)
    staging.release(third)
    assert staging.idle and staging.num_free == 4


def test_two_tier_admission_and_promotion_accounting() -> None:
    geo = KVGeometry(num_layers=4, num_kv_heads=2, head_dim=8, block_size=4, dtype_bytes=4)
    mgr = KVCacheManager(geo, gpu_blocks=12, host_blocks=20, staging_blocks=7)
    placement = Placement.from_letters("HGHG", 4)
    assert mgr.can_allocate(16, placement)  # 4 blocks per layer: 8 GPU + 8 host, staging 4 per layer
    assert not mgr.can_allocate(16, Placement.from_letters("GGGG", 4))  # 16 GPU blocks > 12
    assert not mgr.can_allocate(16, Placement.from_letters("HHHG", 4))  # adjacent host layers: 4 + 4 > 7
    table = mgr.allocate("a", 16, placement)
    assert table is not None and table.letters == "HGHG"
    usage = mgr.usage()
    assert usage.gpu.used_per_layer == (0, 4, 0, 4) and usage.host.used_per_layer == (4, 0, 4, 0)
    assert mgr.allocate("b", 16, placement) is None  # GPU tier has 4 left: no room is a value
    table.num_tokens = 6
    gpu = torch.zeros(12 + 7, 2, 4, 2, 8)
    host = torch.randn(20, 2, 4, 2, 8)
    moved = mgr.start_promotion(table, 0, CopyEngine(), gpu, host)
    assert moved == 2 * geo.bytes_per_block  # only the two filled blocks travel
    assert table.layers[0].residency is Residency.LOADING
    mgr.poll()
    layer0 = table.layers[0]
    assert layer0.home is Tier.GPU and layer0.residency is Residency.GPU and table.letters == "GGHG"
    assert torch.equal(gpu[layer0.gpu_blocks[:2]], host[[0, 1]])
    assert mgr.usage().host.used_per_layer == (0, 0, 4, 0)
    assert mgr.start_promotion(table, 2, CopyEngine(), gpu, host) == -1  # GPU tier full now
    mgr.release("a")
    mgr.poll()
    usage = mgr.usage()
    assert usage.gpu.free_blocks == 12 and usage.host.free_blocks == 20
    assert usage.gpu.used_per_layer == (0,) * 4 == usage.host.used_per_layer


def test_finishing_during_a_promotion_does_not_free_staging_demand_twice() -> None:
    # Regression: a request released while one of its host layers was LOADING used to subtract that
    # layer's staging demand twice, letting admission overcommit the staging pool.
    geo = KVGeometry(num_layers=2, num_kv_heads=1, head_dim=2, block_size=4, dtype_bytes=4)
    mgr = KVCacheManager(geo, gpu_blocks=16, host_blocks=16, staging_blocks=4)
    host_first = Placement((Tier.HOST, Tier.GPU))
    gpu = torch.zeros(16 + 4, 2, 4, 1, 2)
    host = torch.zeros(16, 2, 4, 1, 2)
    a = mgr.allocate("a", 16, host_first)  # 4 blocks per layer: the whole staging pool at layer 0
    assert a is not None
    a.num_tokens = 16  # prefilled
    assert mgr.start_promotion(a, 0, ManualCopyEngine(), gpu, host) > 0
    assert a.layers[0].residency is Residency.LOADING
    mgr.release("a")  # finishes while its promotion is in flight
    assert mgr.allocate("b", 16, host_first) is not None
    # b's layer 0 needs the whole staging pool: a third request host-placed at layer 0 must not fit
    assert not mgr.can_allocate(4, host_first)
    assert mgr.allocate("c", 4, host_first) is None


class ManualCopyEngine(CopyEngine):
    """Copies at once but reports them as in flight until waited for."""

    def copy_blocks(self, src, src_ids, dst, dst_ids):  # type: ignore[no-untyped-def]
        super().copy_blocks(src, src_ids, dst, dst_ids)
        return ManualHandle()


def test_growth_takes_one_block_per_layer_in_its_tier_and_keeps_the_staging_rule() -> None:
    geo = KVGeometry(num_layers=2, num_kv_heads=1, head_dim=2, block_size=4, dtype_bytes=4)
    mgr = KVCacheManager(geo, gpu_blocks=3, host_blocks=10, staging_blocks=3)
    table = mgr.allocate("a", 8, Placement((Tier.GPU, Tier.HOST)))  # 2 blocks per layer: prompt only
    assert table is not None and table.blocks_per_layer == 2
    assert mgr.grow(table, 8)  # nothing to add within the held blocks
    assert mgr.usage().gpu.used_per_layer == (2, 0) and mgr.usage().host.used_per_layer == (0, 2)
    assert mgr.grow(table, 9)  # crossing a boundary: one more block in each layer's own tier
    assert table.blocks_per_layer == 3 and [len(lb.gpu_blocks) for lb in table.layers] == [3, 0]
    assert mgr.usage().gpu.used_per_layer == (3, 0) and mgr.usage().host.used_per_layer == (0, 3)
    assert mgr.growth_shortfall(table, 13) is Tier.GPU and not mgr.grow(table, 13)
    assert table.blocks_per_layer == 3 and mgr.usage().host.used_per_layer == (0, 3)  # nothing taken
    # The host layer may grow only while staging holds it: a second request's host blocks count.
    other = mgr.allocate("b", 1, Placement((Tier.HOST, Tier.HOST)))
    assert other is None  # staging: layer 1 would hold 3 + 1 host blocks, the pool has 3


def test_swap_out_moves_a_layer_to_host_blocks_and_frees_its_gpu_blocks() -> None:
    geo = KVGeometry(num_layers=2, num_kv_heads=1, head_dim=2, block_size=4, dtype_bytes=4)
    mgr = KVCacheManager(geo, gpu_blocks=8, host_blocks=4, staging_blocks=4)
    table = mgr.allocate("a", 6, Placement.all_gpu(2))  # 2 blocks per layer
    assert table is not None
    table.num_tokens = 5
    gpu = torch.randn(8 + 4, 2, 4, 1, 2)
    host = torch.zeros(4, 2, 4, 1, 2)
    before = gpu[table.layers[1].gpu_blocks].clone()
    assert mgr.swap_candidates(table) == [0, 1]
    moved = mgr.swap_out(table, 1, CopyEngine(), gpu, host)
    assert moved == 2 * geo.bytes_per_block and table.letters == "GH"
    assert torch.equal(host[table.layers[1].host_blocks], before)
    usage = mgr.usage()
    assert usage.gpu.used_per_layer == (2, 0) and usage.host.used_per_layer == (0, 2)
    assert usage.gpu.free_blocks == 6
    assert mgr.swap_candidates(table) == [0]  # host blocks for one more layer, staging 2 + 2 <= 4
    assert mgr.grow(table, 9)  # the swapped layer grows on the host tier
    assert mgr.usage().host.used_per_layer == (0, 3) and mgr.swap_candidates(table) == []
    mgr.release("a")
    assert mgr.usage().gpu.free_blocks == 8 and mgr.usage().host.free_blocks == 4
