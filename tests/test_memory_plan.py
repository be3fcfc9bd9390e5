"""The device-memory plan, fed the free-memory figures of real GPUs (an H200's and an H100's) and
the Llama-3-8B bfloat16 geometry: every item is charged, the GPU tier takes what is left and never
0 blocks, staging follows the host tier (the placements that use it), explicit tiers that do not
fit are refused with the figures; and the engine builds its KV tensors from the plan."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from common.errors import InvalidArgument
from common.types import KVGeometry
from worker_svc import engine as engine_module
from worker_svc.engine import Engine, EngineConfig
from worker_svc.engine_config import plan_inputs
from worker_svc.memory_plan import GIB, SAFETY_BYTES, MemoryPlan, ModelShape, plan_memory
from worker_svc.model.config import PRESETS
from worker_svc.model.loader import weight_bytes

LLAMA3_8B = PRESETS["llama3-8b-random"]
SHAPE = ModelShape(LLAMA3_8B.vocab_size, LLAMA3_8B.hidden_size, LLAMA3_8B.intermediate_size,
                   LLAMA3_8B.num_heads, LLAMA3_8B.num_kv_heads, LLAMA3_8B.head_dim)
GEOMETRY = KVGeometry(32, 8, 128, 16, 2)  # bfloat16, 16-token blocks: 64 KiB per block
WEIGHTS = weight_bytes(LLAMA3_8B, 2)
H200_FREE = 139 * GIB  # what torch.cuda.mem_get_info reports free on an idle H200 (141 GB)
H100_FREE = 79 * GIB  # an idle H100 80GB


def plan(free: int | None, max_model_len: int = 8192, **config: Any) -> MemoryPlan:
    cfg = EngineConfig(dtype="bfloat16", **config)
    return plan_memory(SHAPE, GEOMETRY, plan_inputs(cfg, max_model_len, WEIGHTS, "sdpa"), free)


@pytest.mark.parametrize("free", [H200_FREE, H100_FREE])
def test_the_gpu_tier_takes_what_the_weights_buffers_and_margin_leave(free: int) -> None:
    p = plan(free)
    assert p.weight_bytes == 8_030_261_248 * 2
    assert p.usable_bytes == int(free * 0.9)
    # logits [256 rows, 128256] in bfloat16 plus the float32 copies and the sampler's sort
    assert p.logits_bytes == 256 * 128256 * (2 + 32)
    assert p.activation_bytes > 2048 * 3 * 14336 * 2  # at least the MLP's [T, I] temporaries
    assert p.safety_bytes == SAFETY_BYTES
    assert p.block_table_bytes >= 32 * 256 * 512 * 4  # [L, rows, blocks of a longest request] int32
    assert p.gpu_blocks > 0
    assert p.device_bytes <= p.usable_bytes
    assert p.usable_bytes - p.device_bytes < p.bytes_per_block  # nothing usable is left unplanned
    assert "weights 14.96" in p.describe()


def test_a_larger_device_gets_a_larger_gpu_tier_and_the_same_staging() -> None:
    h200, h100 = plan(H200_FREE), plan(H100_FREE)
    assert h200.staging_blocks == h100.staging_blocks  # staging does not follow the GPU tier
    assert (h200.gpu_blocks - h100.gpu_blocks) * h200.bytes_per_block == pytest.approx(
        (H200_FREE - H100_FREE) * 0.9, abs=2 * h200.bytes_per_block)


def test_staging_is_sized_from_the_host_tier_not_an_eighth_of_the_gpu_tier() -> None:
    p = plan(H200_FREE)
    # default 8 GiB host tier at 8192 tokens: 131,072 blocks; a full host tier over half the
    # 32 layers needs 2 * 131072 / 32 blocks in an adjacent pair
    assert p.host_blocks == 131072
    assert p.staging_blocks == 2 * 131072 // 32
    assert p.staging_blocks < p.gpu_blocks // 8  # the old rule would have taken 12 % of the tier
    assert plan(H200_FREE, host_blocks=0).staging_blocks == 0  # no host tier: nothing is staged
    small = plan(H200_FREE, host_kv_gib=0.25)  # 4,096 host blocks: two layers of a longest request
    assert small.staging_blocks == 2 * GEOMETRY.blocks_for(8192)
    assert plan(H200_FREE, staging_blocks=7).staging_blocks == 7  # explicit wins


def test_an_explicit_gpu_tier_is_kept_when_it_fits_and_refused_with_figures_when_not() -> None:
    assert plan(H200_FREE, gpu_kv_gib=6.25).gpu_blocks == 102400
    assert plan(H200_FREE, gpu_blocks=0).gpu_blocks == 0  # asked for: every layer on the host tier
    with pytest.raises(InvalidArgument) as err:
        plan(H100_FREE, gpu_kv_gib=70.0)
    msg = str(err.value)
    assert "configured GPU tier (1146880 blocks" in msg and "weights 14.96 GiB" in msg


def test_no_room_for_the_gpu_tier_is_an_error_naming_every_figure_not_a_zero_block_tier() -> None:
    # 256 rows x 16k tokens of decode gather (16 GiB) and SDPA's GQA copies of it (4 x 16 GiB),
    # plus a 2048-token chunk's float32 scores and probabilities over 16k (8 GiB): not on an H100
    with pytest.raises(InvalidArgument) as err:
        plan(H100_FREE, max_model_len=16384)
    msg = str(err.value)
    for figure in ("no room is left for the GPU KV tier", "usable 71.10 GiB", "weights 14.96 GiB",
                   "attention workspace 88.00 GiB", "safety 1.00 GiB", "65536 bytes per block",
                   "lower max_num_seqs"):
        assert figure in msg, (figure, msg)
    assert plan(H100_FREE, max_model_len=16384, max_num_seqs=32).gpu_blocks > 0  # the named remedy


def test_the_old_whole_batch_prefill_settings_are_refused_instead_of_a_zero_block_tier() -> None:
    """engine_throughput once set max_num_batched_tokens to 1 << 20 and got 0 GPU blocks."""
    with pytest.raises(InvalidArgument, match="activations"):
        plan(H200_FREE, max_num_batched_tokens=1 << 20, max_prefill_tokens=1 << 20)


def test_without_a_free_figure_the_cpu_defaults_hold() -> None:
    p = plan(None)
    assert p.free_bytes is None and p.safety_bytes == 0
    assert p.gpu_blocks == min(GIB // p.bytes_per_block, 8 * 32 * 512)


def _tiny_engine(monkeypatch: pytest.MonkeyPatch, free: int, **config: Any) -> Engine:
    """A CPU engine that plans as if the device had ``free`` bytes free before its weights."""
    monkeypatch.setattr(engine_module, "device_free_bytes", lambda device, resident: free)
    return Engine.from_config(EngineConfig(model="tiny-llama", max_model_len=256, **config))


def test_the_engine_allocates_its_kv_from_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    free = SAFETY_BYTES + 256 * (1 << 20)
    engine = _tiny_engine(monkeypatch, free, host_blocks=64)
    p = engine.memory_plan
    assert p.free_bytes == free and p.gpu_blocks > 0
    assert engine.kv.gpu.shape[0] == p.gpu_blocks + p.staging_blocks
    assert engine.kv.host.shape[0] == p.host_blocks == 64
    assert engine.capacity.gpu_blocks == p.gpu_blocks
    kv_bytes = engine.kv.gpu.numel() * engine.kv.gpu.element_size()
    assert kv_bytes == p.gpu_kv_bytes
    weights = sum(t.numel() * t.element_size() for t in engine.model.parameters())
    assert weights == p.weight_bytes
    assert weights + p.buffer_bytes + p.safety_bytes + kv_bytes <= p.usable_bytes
    assert engine.kv.gpu.dtype is torch.float32


def test_the_engine_refuses_a_device_without_room(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument, match="no room is left for the GPU KV tier"):
        _tiny_engine(monkeypatch, SAFETY_BYTES // 2)


def test_engine_throughput_sizes_its_engine_for_the_run_on_a_gpu_figure() -> None:
    """The shipped GPU command (8B, bfloat16, batches up to 32 of 512 + 64 tokens) fits an H100
    with room left for the transformers copy of the weights; its GPU tier holds the largest batch."""
    from benchmarks.engine_throughput import run_config

    cfg = run_config("llama3-8b-random", "cuda", "bfloat16", 16, 32, 512, 64, 32)
    assert cfg.gpu_blocks == 32 * 36 * 32 and cfg.max_num_batched_tokens == 32 * 512
    p = plan_memory(SHAPE, GEOMETRY, plan_inputs(cfg, 576, WEIGHTS, "sdpa"), H100_FREE)
    assert p.gpu_blocks == cfg.gpu_blocks and p.staging_blocks == 0 and p.host_blocks == 0
    assert H100_FREE - p.device_bytes > WEIGHTS + 5 * GIB  # transformers' weights and logits


def test_engine_throughput_builds_a_nonzero_tier_on_cpu() -> None:
    from benchmarks.engine_throughput import build_engine, run_engine

    engine = build_engine("tiny-llama", "cpu", "float32", 16, 4, 20, 4)
    assert engine.capacity.gpu_blocks == 4 * 2 * 4 > 0
    got = run_engine(engine, 4, 20, 4)  # the whole largest batch fits and runs
    assert got.prefill_tok_s > 0 and got.decode_tok_s > 0


def _gather_once(backend: Any, cache: torch.Tensor, rows: int, blocks: int) -> None:
    from worker_svc.attention import AttentionMetadata

    table = torch.arange(rows * blocks, dtype=torch.int32).view(rows, blocks) % cache.shape[0]
    meta = AttentionMetadata(is_prefill=False, slot_blocks=torch.zeros(rows, dtype=torch.int64),
                             slot_offsets=torch.zeros(rows, dtype=torch.int64), seq_lens=[1] * rows,
                             block_table=table, context_lens=torch.full((rows,), blocks * 4))
    backend._gather(cache, meta)


def test_the_decode_gather_workspace_never_grows_past_its_budget() -> None:
    """Doubling from 8 blocks (2 rows x 4) for a 9-block gather (3 x 3) would take 16 blocks; the
    plan's bound for 3 rows of 4 blocks is 12, and the old workspace is freed before the new."""
    from tests.test_weight_loading import LiveBytes
    from worker_svc.attention import AttentionBackend

    cache = torch.zeros((20, 2, 4, 2, 8))  # [N, 2, bs, Hkv, D] float32: 512 bytes per block
    backend = AttentionBackend()
    backend.max_gather_blocks = 12
    _gather_once(backend, cache, 2, 4)
    assert backend._work is not None and backend._work.shape[1] == 8
    with LiveBytes() as t:
        _gather_once(backend, cache, 3, 3)
    assert backend._work.shape[1] == 12
    cache_bytes = cache.numel() * 4  # its views (cache[:, 0]) are counted too
    assert t.peak <= cache_bytes + 12 * 512 + 1024  # one workspace, not the old one and the new
    unbounded = AttentionBackend()
    _gather_once(unbounded, cache, 2, 4)
    _gather_once(unbounded, cache, 3, 3)
    assert unbounded._work is not None and unbounded._work.shape[1] == 16  # what the bound prevents


def test_the_engine_bounds_its_gather_by_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _tiny_engine(monkeypatch, SAFETY_BYTES + 256 * (1 << 20), max_num_seqs=4)
    assert engine.memory_plan.gather_blocks == 4 * engine.geometry.blocks_for(256)
    assert engine.backend.max_gather_blocks == engine.memory_plan.gather_blocks


def test_the_worker_logs_its_memory_plan_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    from common.config import WorkerSettings
    from worker_svc.engine_factory import engine_from_settings

    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="worker_svc.engine_factory"):
            engine = engine_from_settings(WorkerSettings(model="tiny-llama", device="cpu", threads=1,
                                                         gpu_blocks=16, host_blocks=8))
    finally:
        torch.set_num_threads(before)
    assert engine.memory_plan.describe() in caplog.text
    assert "GPU tier 16 blocks + staging" in caplog.text and "host tier 8 blocks" in caplog.text


@pytest.mark.parametrize("letters", ["HGHG", "GHGH", "HHHH"])
def test_planned_staging_lets_host_placed_requests_fill_the_host_tier(letters: str) -> None:
    """The staging the plan gives lets requests under half-interleaved or all-host placements take
    every host block before the staging rule refuses one; an eighth of a 64-block GPU tier (8)
    would refuse the ninth interleaved request."""
    from common.types import Placement
    from worker_svc.kv.manager import KVCacheManager
    from worker_svc.memory_plan import staging_for

    geo = KVGeometry(4, 2, 8, 16, 4)
    host = 64
    staging = staging_for(host, 4, geo.blocks_for(64), 256)
    assert staging == 2 * host // 4
    mgr = KVCacheManager(geo, gpu_blocks=256, host_blocks=host, staging_blocks=staging)
    placement = Placement.from_letters(letters, 4)
    admitted = 0
    while mgr.can_allocate(16, placement):  # one block per layer each
        assert mgr.allocate(f"r{admitted}", 16, placement) is not None
        admitted += 1
    assert admitted * placement.host_layers == host  # the host tier ran out, not staging
    # host layers concentrated in fewer than half the layers are admitted until staging is full
    dense = KVCacheManager(geo, gpu_blocks=256, host_blocks=host, staging_blocks=staging)
    taken = sum(dense.allocate(f"d{i}", 16, Placement.from_letters("HHGG", 4)) is not None
                for i in range(host))
    assert taken == staging // 2  # a no-room answer, like any full tier
    old = KVCacheManager(geo, gpu_blocks=64, host_blocks=host, staging_blocks=64 // 8)
    assert sum(old.allocate(f"r{i}", 16, Placement.from_letters("HGHG", 4)) is not None
               for i in range(host)) == 8
