"""The cost-model profiler on CPU: it produces a usable, positive cost model from real runs, leaves
the engine's pools full, and what it measures is what the worker advertises and the placement rule
uses: a worker with a slow copy link advertises a slower link and gets more GPU layers, one with a
slow forward advertises slower steps."""

from __future__ import annotations

import time
from typing import Any

import grpc.aio
import pytest
import torch

from common.config import WorkerSettings
from common.cost_profile import ProfileSource
from common.placement import interleaved, rule_placement
from common.proto.layerkv.v1 import worker_pb2, worker_pb2_grpc
from scheduler_svc.policies.base import WorkerSnapshot
from scheduler_svc.policies.layerkv_placement import placement_for
from scheduler_svc.wire import describe_from_proto
from scheduler_svc.worker_events import WorkerDescription
from tests.fleet import TINY
from worker_svc.engine import Engine, EngineConfig
from worker_svc.kv.offload import CopyEngine, CopyHandle
from worker_svc.model.loader import load_model
from worker_svc.server import create_server

SLOW_LINK_BYTES_PER_S = 1e6  # a link this slow cannot hide a 512-token prompt's layers under its prefill
SLOW_FORWARD_S = 0.05  # well above a tiny-llama step, even on a busy machine


class SlowLink(CopyEngine):
    """Block copies that take as long as they would over a ``SLOW_LINK_BYTES_PER_S`` link."""

    def copy_blocks(self, src: torch.Tensor, src_ids: list[int], dst: torch.Tensor,
                    dst_ids: list[int]) -> CopyHandle:
        handle = super().copy_blocks(src, src_ids, dst, dst_ids)
        time.sleep(len(src_ids) * src[0].numel() * src.element_size() / SLOW_LINK_BYTES_PER_S)
        return handle


def make_profiled_engine(copy_engine: CopyEngine | None = None, slow_forward_s: float = 0.0) -> Engine:
    config = EngineConfig(model=TINY, device="cpu", dtype="float32", gpu_blocks=512, host_blocks=512,
                          max_model_len=1024, profile="startup", profile_budget_s=0.5,
                          host_access="stream")  # host layers over a link (a copy engine) to profile
    loaded = load_model(TINY, torch.device("cpu"), torch.float32, 0)
    if slow_forward_s:
        forward = loaded.model.forward

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(slow_forward_s)
            return forward(*args, **kwargs)

        loaded.model.forward = slow  # every step's forward, the profile's included
    return Engine(config, loaded, torch.device("cpu"), torch.float32, copy_engine)


def test_profile_at_start_gives_positive_cost_model() -> None:
    engine = Engine.from_config(EngineConfig(model="tiny-llama", profile="startup", max_model_len=256))
    profile = engine.cost_profile
    assert profile.info.source is ProfileSource.MEASURED and profile.info.duration_s > 0
    assert profile.key is not None and profile.key.model == "tiny-llama" and profile.key.num_layers == 4
    cost = engine.cost_model
    assert cost == profile.cost_model
    assert cost.d2h_bytes_per_s > 0 and cost.h2d_bytes_per_s > 0
    assert cost.prefill_s(128) > 0 and cost.decode_step_s(4, 512) > 0
    assert cost.prefill_s(200) >= cost.prefill_s(20)
    usage = engine.usage()
    assert usage.gpu.free_blocks == usage.gpu.total_blocks
    assert usage.host.free_blocks == usage.host.total_blocks
    letters = rule_placement(128, engine.geometry, cost).letters
    assert letters == interleaved(engine.geometry.num_layers, letters.count("G")).letters


def test_profile_off_keeps_the_defaults_and_says_so() -> None:
    engine = Engine.from_config(EngineConfig(model="tiny-llama", max_model_len=256))
    assert engine.cost_profile.info.source is ProfileSource.DEFAULT and engine.cost_profile.key is None
    assert engine.cost_model == engine.cost_profile.cost_model


async def described(engine: Engine) -> WorkerDescription:
    """Start a worker on port 0 around ``engine`` and decode its Describe as the scheduler does."""
    settings = WorkerSettings.build(host="127.0.0.1", port=0, metrics_port=0, worker_id="w-prof")
    server, port = await create_server(settings, engine=engine)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        reply = await stub.Describe(worker_pb2.DescribeRequest(), timeout=30)
        return describe_from_proto(reply)
    finally:
        await channel.close(None)
        await server.stop(0)


def snapshot(d: WorkerDescription) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id=d.worker_id, geometry=d.geometry, gpu_blocks_total=d.capacity.gpu_blocks,
        host_blocks_total=d.capacity.host_blocks, gpu_blocks_free=d.capacity.gpu_blocks,
        host_blocks_free=d.capacity.host_blocks, max_model_len=d.max_model_len, cost_model=d.cost_model,
        running=(), accepting=True, staging_blocks_total=d.staging_blocks,
        max_num_batched_tokens=d.max_num_batched_tokens,
    )


@pytest.fixture(scope="module")
def normal_engine() -> Engine:
    return make_profiled_engine()


async def test_a_slow_link_is_advertised_and_gets_more_gpu_layers(normal_engine: Engine) -> None:
    normal = await described(normal_engine)
    slow = await described(make_profiled_engine(copy_engine=SlowLink()))
    assert normal.profile.source is slow.profile.source is ProfileSource.MEASURED
    # What Describe carries is what the profile measured: a link at most a few times the simulated one.
    assert slow.cost_model.d2h_bytes_per_s < 2 * SLOW_LINK_BYTES_PER_S
    assert slow.cost_model.h2d_bytes_per_s < 2 * SLOW_LINK_BYTES_PER_S
    assert normal.cost_model.d2h_bytes_per_s > 10 * slow.cost_model.d2h_bytes_per_s
    prompt = 512
    fast_place = placement_for(prompt, 16, snapshot(normal), normal.capacity.gpu_blocks, 512)
    slow_place = placement_for(prompt, 16, snapshot(slow), slow.capacity.gpu_blocks, 512)
    assert fast_place is not None and slow_place is not None
    # The offload of a host layer no longer hides under the prefill: the rule keeps more on the GPU.
    assert slow_place.gpu_layers > fast_place.gpu_layers, (fast_place, slow_place)


async def test_a_slow_forward_is_advertised_as_slower_steps(normal_engine: Engine) -> None:
    normal = await described(normal_engine)
    slow = await described(make_profiled_engine(slow_forward_s=SLOW_FORWARD_S))
    # Every step runs one forward: the profiled batch-1 decode step and a prefill carry the sleep.
    for predicted in (lambda c: c.decode_step_s(1, 64), lambda c: c.prefill_s(64)):
        assert predicted(slow.cost_model) > max(predicted(normal.cost_model), 0.9 * SLOW_FORWARD_S)
