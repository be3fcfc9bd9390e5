"""Preemption and chunked prefill seen through the WorkerService over real gRPC: Describe names the
preemption mode and token budget, a dispatch may pick its own mode, and StreamEvents reports the
requests preempted, the ones waiting on the worker and the per-step split, while each client's
tokens equal an unpreempted run's (none repeated, none changed)."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from common.config import WorkerSettings
from common.proto.layerkv.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from common.types import SamplingParams
from tests.fleet import make_engine, proto_sampling, reference_outputs
from worker_svc.server import create_server

TIMEOUT_S = 60.0
PROMPTS = [[256, *range(1, 16)], [256, *range(40, 55)]]  # 16 tokens: one block per layer each
NEW = 40  # each grows to 56 tokens: 4 blocks per layer, 32 of the 20 GPU blocks together


@pytest.mark.parametrize("mode", ["recompute", "swap-layers"])
async def test_preemption_is_reported_and_tokens_stay_exact(mode: str) -> None:
    engine = make_engine(gpu_blocks=20, host_blocks=64, max_num_batched_tokens=64, max_promotions_per_step=0)
    server, port = await create_server(
        WorkerSettings.build(host="127.0.0.1", port=0, metrics_port=0, worker_id="w-pre"), engine=engine)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    try:
        d = await stub.Describe(worker_pb2.DescribeRequest())
        assert (d.preemption_mode, d.max_num_batched_tokens) == ("recompute", 64)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Dispatch(worker_pb2.DispatchRequest(
                request_id="x", prompt_token_ids=[256, 1], sampling=proto_sampling(4), preemption="drop"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "drop" in (bad.value.details() or "")
        events = stub.StreamEvents(worker_pb2.StreamEventsRequest())
        it = events.__aiter__()
        await anext(it)
        for i, prompt in enumerate(PROMPTS):
            reply = await stub.Dispatch(worker_pb2.DispatchRequest(
                request_id=f"r{i}", prompt_token_ids=prompt, sampling=proto_sampling(NEW),
                placement="GGGG", preemption=mode))
            assert (reply.gpu_blocks, reply.host_blocks) == (4, 0)  # the prompt's block per layer
        tokens: dict[str, list[int]] = {"r0": [], "r1": []}
        finished: set[str] = set()
        preempted, waiting, swapped, preemptions = [], [], 0, 0
        while finished != {"r0", "r1"}:
            ev = await asyncio.wait_for(anext(it), TIMEOUT_S)
            preempted += ev.preempted_request_ids
            waiting += ev.waiting_request_ids
            swapped += ev.step.num_swapped_layers
            preemptions += ev.step.num_preemptions
            assert ev.step.num_tokens == ev.step.num_prefill_tokens + ev.step.num_decode_requests
            for t in ev.tokens:
                tokens[t.request_id] += t.token_ids
                if t.finished:
                    assert t.finish_reason == types_pb2.FINISH_REASON_LENGTH
                    finished.add(t.request_id)
        events.cancel()
        assert preemptions > 0
        if mode == "recompute":
            assert preempted and set(preempted) <= set(waiting) and swapped == 0
        else:
            assert swapped > 0 and not preempted
        want = reference_outputs(make_engine(), PROMPTS, SamplingParams(max_tokens=NEW, ignore_eos=True))
        assert [tokens["r0"], tokens["r1"]] == want
        usage = engine.usage()
        assert usage.gpu.free_blocks == 20 and usage.host.free_blocks == 64
        metric = server.metrics.registry.get_sample_value
        assert metric("layerkv_worker_preemptions_total", {"worker": "w-pre"}) == preemptions
        assert metric("layerkv_worker_swapped_layers_total", {"worker": "w-pre"}) == swapped
    finally:
        await channel.close(None)
        await server.stop(0)
