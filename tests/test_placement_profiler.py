"""The cost-model profiler on CPU: it produces a usable, positive cost model from real runs, leaves
the engine's pools full, and the rule placement it feeds is interleaved."""

from __future__ import annotations

from common.placement import interleaved, rule_placement
from worker_svc.engine import Engine, EngineConfig


def test_profile_at_start_gives_positive_cost_model() -> None:
    engine = Engine.from_config(EngineConfig(model="tiny-llama", profile=True, max_model_len=256))
    cost = engine.cost_model
    assert cost.d2h_bytes_per_s > 0 and cost.h2d_bytes_per_s > 0
    assert cost.prefill_s(128) > 0 and cost.decode_step_s(4, 512) > 0
    assert cost.prefill_s(200) >= cost.prefill_s(20)
    usage = engine.usage()
    assert usage.gpu.free_blocks == usage.gpu.total_blocks
    assert usage.host.free_blocks == usage.host.total_blocks
    letters = rule_placement(128, engine.geometry, cost).letters
    assert letters == interleaved(engine.geometry.num_layers, letters.count("G")).letters
