"""Drives one workload against a running scheduler over gRPC and measures every request.

Each request is sent at its arrival time (open loop: a slow server does not slow the arrivals),
streamed to the end, and timed on the client: time of sending, of the first token and of the final
message; the queueing time comes from the scheduler's final message. ``set_policy`` switches the
scheduler's policy through the Admin API between two runs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import json_format, struct_pb2

from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from common.security import bearer_metadata
from common.types import CostModel
from common.wire import cost_model_from_proto
from layerkv.bench.report import RequestResult
from layerkv.bench.slo import (
    Batch1Times,
    SloBasis,
    choose_source,
    from_cost_models,
    from_probe,
    probe_prompts,
)
from layerkv.bench.workload import BenchRequest


@dataclass(frozen=True)
class ClientConfig:
    """How the load generator talks to the scheduler."""

    endpoint: str  # host:port of SchedulerService / AdminService
    ttft_slo_s: float  # sent with every request
    tpot_slo_s: float
    request_timeout_s: float = 600.0  # deadline of one Generate call
    api_token: str = ""  # bearer token of SchedulerService, when the scheduler requires one
    admin_token: str = ""  # bearer token of AdminService


async def set_policy(config: ClientConfig, name: str, params: dict[str, object]) -> str:
    """Make ``name`` (with ``params``) the scheduler's policy; returns the previous policy's name."""
    struct = struct_pb2.Struct()
    json_format.ParseDict(params, struct)
    async with grpc.aio.insecure_channel(config.endpoint) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        response = await stub.SetPolicy(
            admin_pb2.SetPolicyRequest(policy=admin_pb2.PolicySpec(name=name, params=struct)),
            metadata=bearer_metadata(config.admin_token),
            timeout=30.0,
        )
    return str(response.previous.name)


async def wait_ready(config: ClientConfig, timeout_s: float = 120.0) -> int:
    """Wait until the scheduler lists at least one healthy worker; returns how many are healthy."""
    deadline = time.monotonic() + timeout_s
    last_error = "no healthy worker"
    async with grpc.aio.insecure_channel(config.endpoint) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                response = await stub.ListWorkers(
                    admin_pb2.ListWorkersRequest(), metadata=bearer_metadata(config.admin_token), timeout=5.0
                )
                healthy = sum(1 for w in response.workers if w.healthy and not w.draining)
                if healthy:
                    return healthy
            except grpc.aio.AioRpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(0.2)
    raise TimeoutError(f"scheduler at {config.endpoint} not ready after {timeout_s:.0f} s ({last_error})")


async def worker_cost_models(config: ClientConfig) -> list[CostModel]:
    """The cost model each healthy worker advertises (its profile, or the scheduler's online fit)."""
    async with grpc.aio.insecure_channel(config.endpoint) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        response = await stub.ListWorkers(
            admin_pb2.ListWorkersRequest(), metadata=bearer_metadata(config.admin_token), timeout=10.0
        )
    return [cost_model_from_proto(w.cost_model) for w in response.workers if w.healthy and not w.draining]


async def batch1_times(
    config: ClientConfig,
    basis: SloBasis,
    prompt_tokens: int,
    probe_output_tokens: int = 32,
    probe_repeats: int = 5,
    vocab_high: int = 256,
    seed: int = 0,
) -> Batch1Times:
    """What one request alone gets on this fleet, from the workers' cost models or a probe.

    Call it before other traffic: the advertised model is the scheduler's online fit, which a few
    requests move away from the worker's profile. The probe sends one unmeasured warm-up request
    and then ``probe_repeats`` requests of ``prompt_tokens``, each alone on the fleet, and takes
    the median client-side TTFT and TPOT (so it includes what every request pays: gRPC, the
    scheduler's round, streaming).
    """
    costs = await worker_cost_models(config)
    if choose_source(basis, costs) == "cost-model":
        return from_cost_models(costs, prompt_tokens)
    ttfts: list[float] = []
    tpots: list[float] = []
    prompts = probe_prompts(prompt_tokens, probe_repeats + 1, vocab_high, seed)
    for i, prompt in enumerate(prompts):
        (result,) = await run_workload(config, [BenchRequest(i, 0.0, prompt, max(2, probe_output_tokens))])
        if not result.ok:
            raise RuntimeError(f"the batch-1 probe request failed: {result.error}")
        if i == 0:
            continue  # the warm-up
        if (ttft := result.ttft_s) is not None:
            ttfts.append(ttft)
        if (tpot := result.tpot_s) is not None:
            tpots.append(tpot)
    return from_probe(ttfts, tpots, prompt_tokens)


def _generate_request(config: ClientConfig, run_id: str, req: BenchRequest) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        request_id=f"bench-{run_id}-{req.index}",
        token_ids=scheduler_pb2.TokenIds(ids=list(req.prompt_token_ids)),
        # Greedy and EOS ignored: every policy generates exactly max_tokens tokens per request.
        sampling=types_pb2.SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True),
        slo=types_pb2.Slo(ttft_s=config.ttft_slo_s, tpot_s=config.tpot_slo_s),
        # The last tokens ride in the final message (one message fewer per request; a scheduler
        # from before the field ignores it and sends them in a chunk, which is read alike).
        final_with_tokens=True,
    )


async def _one(
    stub: scheduler_pb2_grpc.SchedulerServiceStub,
    config: ClientConfig,
    run_id: str,
    req: BenchRequest,
    start: float,
) -> RequestResult:
    # The event loop's timer may fire up to a millisecond early: sleep again until the arrival.
    while (delay := start + req.arrival_s - time.monotonic()) > 0:
        await asyncio.sleep(delay)
    sent = time.monotonic() - start
    first: float | None = None
    finished: float | None = None
    tokens = 0
    queue_s: float | None = None
    error = ""
    try:
        call = stub.Generate(
            _generate_request(config, run_id, req),
            metadata=bearer_metadata(config.api_token),
            timeout=config.request_timeout_s,
        )
        async for message in call:
            now = time.monotonic() - start
            if message.HasField("chunk"):
                if first is None and message.chunk.token_ids:
                    first = now
                tokens += len(message.chunk.token_ids)
            elif message.HasField("final"):
                final = message.final
                if final.last_chunk.token_ids:  # tokens no chunk carried: they arrive now
                    if first is None:
                        first = now
                    tokens += len(final.last_chunk.token_ids)
                finished = now
                queue_s = float(final.queue_s)
                tokens = max(tokens, int(final.output_tokens))
                if final.finish_reason == types_pb2.FINISH_REASON_ERROR:
                    error = f"worker error: {final.error}"
                elif final.finish_reason == types_pb2.FINISH_REASON_ABORT:
                    error = "aborted"
    except grpc.aio.AioRpcError as exc:
        error = f"{exc.code().name}: {exc.details()}"
    if not error and finished is None:
        error = "stream ended without a final message"
    return RequestResult(
        index=req.index,
        prompt_tokens=len(req.prompt_token_ids),
        sent_s=sent,
        first_token_s=first,
        finished_s=finished,
        output_tokens=tokens,
        queue_s=queue_s,
        error=error,
    )


async def run_workload(
    config: ClientConfig,
    requests: Sequence[BenchRequest],
    on_done: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    """Send every request at its arrival time; results in request order."""
    run_id = uuid.uuid4().hex[:8]  # fresh ids: a rerun must not attach to an earlier run's requests
    async with grpc.aio.insecure_channel(config.endpoint) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        start = time.monotonic()

        async def tracked(req: BenchRequest) -> RequestResult:
            result = await _one(stub, config, run_id, req, start)
            if on_done is not None:
                on_done(result)
            return result

        results = await asyncio.gather(*(tracked(r) for r in requests))
    return sorted(results, key=lambda r: r.index)


def parse_policy_params(items: Sequence[str]) -> dict[str, dict[str, object]]:
    """``["layerkv={\"prefill_safety\": 1.5}"]`` → ``{"layerkv": {"prefill_safety": 1.5}}``."""
    parsed: dict[str, dict[str, object]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"policy parameters {item!r} must be NAME=JSON")
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"policy parameters of {name!r} must be a JSON object, got {text!r}")
        parsed[name.strip()] = value
    return parsed
