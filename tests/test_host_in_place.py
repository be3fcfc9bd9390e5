"""Host layers read in place (``host_access``): on CPU the host tier is the compute device's own
memory, so attention reads host-placed layers where they live instead of streaming them through
staging. Same tokens as transformers and as streaming (``test_placement_equivalence`` and the
chunked-prefill, growth and preemption tests run both modes); here: no staging and no copies,
admission no longer bounded by a staging pool, the cost model the worker advertises, and the
configuration errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common import kv_budget
from common.cost_profile import CostProfile
from common.errors import InvalidArgument
from common.placement import min_resident_layers
from common.types import CostModel, KVGeometry, Placement, TierCapacity
from common.wire import cost_model_from_proto, cost_model_to_proto
from tests.test_engine_reference import Job, assert_matches, hf_generate, make_engine, prompt_of, run_engine
from worker_svc.engine_config import EngineConfig, reads_host_in_place
from worker_svc.outputs import StepOutput

LAYERS = 4


def test_auto_reads_in_place_on_cpu_and_streams_on_cuda() -> None:
    assert reads_host_in_place(EngineConfig(), "cpu")
    assert not reads_host_in_place(EngineConfig(), "cuda")
    assert not reads_host_in_place(EngineConfig(host_access="stream"), "cpu")
    with pytest.raises(InvalidArgument, match="needs the CPU device"):
        reads_host_in_place(EngineConfig(host_access="direct"), "cuda")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"host_access": "mapped"}, "host_access 'mapped' must be one of auto, stream, direct"),
    ({"host_access": "direct", "device": "cuda"}, "needs device='cpu'"),
])
def test_bad_host_access_is_refused_by_name(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        EngineConfig(**kwargs)


def test_host_layers_take_no_staging_and_copy_nothing(hf_and_folder: tuple[Any, Path]) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=64, host_blocks=64, staging_blocks=12)
    assert engine.host_in_place and engine.kv_manager.staging.num_blocks == 0  # no pool, whatever was asked
    assert engine.memory_plan.staging_blocks == 0
    # The host tier is a view of the one tensor attention reads: a block written through the host
    # view is the compute tensor's block host_offset + id.
    offset = engine.kv.host_offset
    assert offset == 64 and engine.kv.compute.data_ptr() == engine.kv.gpu.data_ptr()
    engine.kv.host[3].fill_(7.0)
    assert bool((engine.kv.compute[offset + 3] == 7.0).all())
    engine.kv.host[3].zero_()
    prompt = prompt_of(18, 4)
    steps: list[StepOutput] = []
    got = run_engine(engine, {"h": Job(prompt, 8, placement="HGHH")}, steps=steps)
    assert_matches(got["h"], hf_generate(model, prompt, 8))
    assert steps and all(s.stats.bytes_loaded == s.stats.bytes_offloaded == 0 for s in steps)
    assert any(r.placement == "HGHH" for s in steps for r in s.running)  # never promoted: nothing to gain


def concurrent_peak(engine: Any, n: int) -> int:
    """Most requests running at once when ``n`` all-host prompts of 12 tokens arrive together."""
    steps: list[StepOutput] = []
    jobs = {f"r{i}": Job(prompt_of(12, 60 + i), 6, placement="HHHH") for i in range(n)}
    run_engine(engine, jobs, steps=steps)
    return max(len(s.running) for s in steps)


def test_admission_is_not_bounded_by_a_staging_pool(hf_and_folder: tuple[Any, Path]) -> None:
    _, folder = hf_and_folder
    # 12-token prompts take 3 blocks per layer (4 with the first output's growth); 8 staging blocks
    # hold one request's two adjacent host layers, so streaming runs one request at a time.
    streamed = make_engine(folder, host_access="stream", block_size=4, gpu_blocks=16, host_blocks=200,
                           staging_blocks=8)
    in_place = make_engine(folder, host_access="direct", block_size=4, gpu_blocks=16, host_blocks=200)
    assert concurrent_peak(streamed, 4) == 1
    assert concurrent_peak(in_place, 4) == 4


def test_the_advertised_cost_model_says_host_layers_cost_no_transfer(hf_and_folder: tuple[Any, Path]) -> None:
    _, folder = hf_and_folder
    assert make_engine(folder, block_size=4, gpu_blocks=16, host_blocks=16).cost_model.host_in_place
    assert not make_engine(folder, host_access="stream", block_size=4, gpu_blocks=16,
                           host_blocks=16).cost_model.host_in_place
    geometry = KVGeometry(LAYERS, 2, 16, 4, 4)
    slow_link = CostModel(d2h_bytes_per_s=1e3, h2d_bytes_per_s=1e3, decode_base_s=0.01)
    in_place = CostModel(d2h_bytes_per_s=1e3, h2d_bytes_per_s=1e3, decode_base_s=0.01, host_in_place=True)
    # Streaming prices the bytes on the link; in place they cost nothing.
    assert slow_link.decode_step_s(1, 100, h2d_bytes=10_000) == pytest.approx(10.01)
    assert in_place.decode_step_s(1, 100, h2d_bytes=10_000) == pytest.approx(0.01)
    # The paper's rule keeps layers on the GPU to hide slow offloads; with no copies it keeps none.
    assert min_resident_layers(64, geometry, slow_link) == LAYERS
    assert min_resident_layers(64, geometry, in_place) == 0
    # The flag crosses the wire, and a saved profile leaves it to the engine that loads it.
    assert cost_model_from_proto(cost_model_to_proto(in_place)).host_in_place
    saved = CostProfile(cost_model=in_place).to_json()
    assert "host_in_place" not in saved and not CostProfile.from_json(saved).cost_model.host_in_place


def test_never_fits_skips_the_staging_rule_in_place() -> None:
    geometry = KVGeometry(LAYERS, 2, 16, 4, 4)
    capacity = TierCapacity(0, 100)
    placement = Placement.from_letters("HHHH", LAYERS)
    assert "staging" in str(kv_budget.never_fits(geometry, 16, placement, capacity, 4))
    assert kv_budget.never_fits(geometry, 16, placement, capacity, None) is None
