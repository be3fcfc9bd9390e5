"""Drives one workload against a running scheduler over gRPC and measures every request.

Each request is sent at its arrival time (open loop: a slow server does not slow the arrivals),
streamed to the end, and timed on the client: time of sending, of the first token and of the final
message, each taken when the message carrying it was read off the call; the queueing time comes
from the scheduler's final message. A run's requests share one ``GenerateStream`` call.
``set_policy`` switches the scheduler's policy through the Admin API between two runs.
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

from common.errors import LayerKVError
from common.grpc_errors import status_of
from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc
from common.security import bearer_metadata
from common.stream_client import GenerateClient, GenerateJob, Tokens
from common.types import CostModel, FinishReason, SamplingParams
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
    request_timeout_s: float = 600.0  # deadline of one request
    api_token: str = ""  # bearer token of SchedulerService, when the scheduler requires one
    admin_token: str = ""  # bearer token of AdminService
    multiplex: bool = True  # one GenerateStream for a run's requests; False: a Generate call each


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


def _job(config: ClientConfig, run_id: str, req: BenchRequest) -> GenerateJob:
    return GenerateJob(
        prompt=tuple(req.prompt_token_ids),
        # Greedy and EOS ignored: every policy generates exactly max_tokens tokens per request.
        sampling=SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True),
        request_id=f"bench-{run_id}-{req.index}",
        ttft_slo_s=config.ttft_slo_s,
        tpot_slo_s=config.tpot_slo_s,
    )


async def _one(
    client: GenerateClient, config: ClientConfig, run_id: str, req: BenchRequest, start: float
) -> RequestResult:
    # The event loop's timer may fire up to a millisecond early: sleep again until the arrival.
    while (delay := start + req.arrival_s - time.monotonic()) > 0:
        await asyncio.sleep(delay)
    sent = time.monotonic() - start
    first: float | None = None
    finished: float | None = None
    tokens = 0
    queue_s: float | None = None
    server_ttft: float | None = None
    error = ""
    stream = client.generate(_job(config, run_id, req))
    try:
        async with asyncio.timeout(config.request_timeout_s):
            # Each event carries when its message was read off the call: the request's own
            # arrival times, not when this task got round to it.
            async for event in stream:
                now = event.received_s - start
                if isinstance(event, Tokens):
                    if first is None and event.token_ids:
                        first = now
                    tokens += len(event.token_ids)
                else:
                    finished = now
                    queue_s = event.queue_s
                    server_ttft = event.ttft_s or None
                    tokens = max(tokens, event.output_tokens)
                    if event.finish_reason == FinishReason.ERROR:
                        error = f"worker error: {event.error}"
                    elif event.finish_reason == FinishReason.ABORT:
                        error = "aborted"
    except TimeoutError:
        stream.cancel()
        finished, error = None, f"DEADLINE_EXCEEDED: no final after {config.request_timeout_s:g} s"
    except LayerKVError as exc:
        error = f"{status_of(exc).name}: {exc}"
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
        server_ttft_s=server_ttft,
    )


async def run_workload(
    config: ClientConfig,
    requests: Sequence[BenchRequest],
    on_done: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    """Send every request at its arrival time; results in request order.

    All of them share one ``GenerateStream`` call (``common.stream_client``; one ``Generate`` call
    each with ``config.multiplex`` False or on a scheduler without the stream)."""
    run_id = uuid.uuid4().hex[:8]  # fresh ids: a rerun must not attach to an earlier run's requests
    async with grpc.aio.insecure_channel(config.endpoint) as channel:
        client = GenerateClient(channel, bearer_metadata(config.api_token), multiplex=config.multiplex)
        start = time.monotonic()

        async def tracked(req: BenchRequest) -> RequestResult:
            result = await _one(client, config, run_id, req, start)
            if on_done is not None:
                on_done(result)
            return result

        try:
            results = await asyncio.gather(*(tracked(r) for r in requests))
        finally:
            await client.close()
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
