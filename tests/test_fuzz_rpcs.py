"""Fuzzing every RPC of the scheduler, admin and worker services with real servers.

A real scheduler (real redis-server) on port 0 in front of a real tiny-llama worker on port 0,
both with tokens. A few thousand messages go through generic channel methods with identity
serializers: random bytes, mutated encodings of valid messages, and well-formed messages with
random field values (huge ids, NaN, negative and huge numbers, long repeated fields). Asserted:
every answer is a status documented for that RPC (never UNKNOWN or INTERNAL), a valid request
succeeds on each service afterwards, and the logs stay bounded (at most one line per bad message,
rate-limited, no tracebacks).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import struct_pb2

from common.config import SchedulerSettings, WorkerSettings
from common.proto.layerkv.v1 import admin_pb2, scheduler_pb2, types_pb2, worker_pb2
from common.security import bearer_metadata, open_channel
from scheduler_svc.server import SchedulerServer
from scheduler_svc.server import create_server as create_scheduler
from tests.fleet import make_engine
from worker_svc.server import WorkerServer
from worker_svc.server import create_server as create_worker

pytestmark = pytest.mark.slow

SEED = 20241002
MESSAGES = 3000
CONCURRENCY = 64
# Calls that may wait by design (streams, RegisterWorker dialling a dead address) end at a short
# deadline, which they may answer with DEADLINE_EXCEEDED; the others must answer, however loaded
# the machine is, within a long one.
WAITING_TIMEOUT_S = 1.0
CALL_TIMEOUT_S = 30.0
API, ADMIN, WORKER = "api-fuzz", "admin-fuzz", "worker-fuzz"

C = grpc.StatusCode
ALWAYS = {C.OK, C.INVALID_ARGUMENT, C.UNAUTHENTICATED}
STREAMS = {C.DEADLINE_EXCEEDED}  # a stream still open when the client's deadline hits
# What each RPC may answer (its proto comments); anything else is a failure.
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "/layerkv.v1.SchedulerService/Generate": ALWAYS
    | STREAMS
    | {C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.UNAVAILABLE},
    "/layerkv.v1.SchedulerService/Attach": ALWAYS | STREAMS | {C.NOT_FOUND},
    # Per-request errors are tagged statuses in the stream; the call fails only as a whole.
    "/layerkv.v1.SchedulerService/GenerateStream": ALWAYS | STREAMS,
    "/layerkv.v1.SchedulerService/Cancel": ALWAYS | {C.NOT_FOUND},
    "/layerkv.v1.SchedulerService/GetRequest": ALWAYS | {C.NOT_FOUND},
    "/layerkv.v1.AdminService/ListPolicies": ALWAYS,
    "/layerkv.v1.AdminService/GetPolicy": ALWAYS,
    "/layerkv.v1.AdminService/SetPolicy": ALWAYS | {C.NOT_FOUND},
    "/layerkv.v1.AdminService/ListWorkers": ALWAYS,
    "/layerkv.v1.AdminService/DrainWorker": ALWAYS | {C.NOT_FOUND},
    "/layerkv.v1.AdminService/UndrainWorker": ALWAYS | {C.NOT_FOUND},
    "/layerkv.v1.AdminService/RegisterWorker": ALWAYS | {C.UNAVAILABLE, C.DEADLINE_EXCEEDED},
    "/layerkv.v1.AdminService/ProfileWorker": ALWAYS | {C.NOT_FOUND, C.FAILED_PRECONDITION, C.UNAVAILABLE},
    "/layerkv.v1.WorkerService/Describe": ALWAYS,
    "/layerkv.v1.WorkerService/GetTokenizer": ALWAYS,
    "/layerkv.v1.WorkerService/Dispatch": ALWAYS | {C.RESOURCE_EXHAUSTED, C.ALREADY_EXISTS},
    "/layerkv.v1.WorkerService/DispatchBatch": ALWAYS,  # each request's outcome is in the reply
    "/layerkv.v1.WorkerService/StreamEvents": ALWAYS | STREAMS,
    "/layerkv.v1.WorkerService/Abort": ALWAYS,
    "/layerkv.v1.WorkerService/Profile": ALWAYS | {C.FAILED_PRECONDITION},
}


@dataclass(frozen=True)
class Rpc:
    path: str
    request_type: type[pb_message.Message]
    streaming: bool
    client_streaming: bool  # the fuzzed message is the only one on a request stream
    seeds: tuple[pb_message.Message, ...]  # valid requests the mutations start from
    token: str
    target: str  # "scheduler" or "worker"


def _rpcs() -> list[Rpc]:
    sampling = types_pb2.SamplingParams(max_tokens=2, ignore_eos=True)
    seeds: dict[str, tuple[pb_message.Message, ...]] = {
        "Generate": (
            scheduler_pb2.GenerateRequest(token_ids=scheduler_pb2.TokenIds(ids=[1, 2, 3]), sampling=sampling),
            scheduler_pb2.GenerateRequest(request_id="fuzz-1", text="hello", sampling=sampling),
        ),
        "Attach": (scheduler_pb2.AttachRequest(request_id="fuzz-1", offset=1),),
        "GenerateStream": (
            scheduler_pb2.GenerateStreamRequest(requests=[
                scheduler_pb2.TaggedGenerateRequest(tag=1, request=scheduler_pb2.GenerateRequest(
                    token_ids=scheduler_pb2.TokenIds(ids=[1, 2, 3]), sampling=sampling)),
                scheduler_pb2.TaggedGenerateRequest(tag=2, request=scheduler_pb2.GenerateRequest(
                    request_id="fuzz-2", text="hello", sampling=sampling)),
            ], cancel_tags=[2]),
        ),
        "Cancel": (scheduler_pb2.CancelRequest(request_id="fuzz-none"),),
        "GetRequest": (scheduler_pb2.GetRequestRequest(request_id="fuzz-1"),),
        "SetPolicy": (admin_pb2.SetPolicyRequest(policy=_spec("least-loaded", {"skip_blocked": True})),),
        "DrainWorker": (admin_pb2.DrainWorkerRequest(worker_id="nobody"),),
        "UndrainWorker": (admin_pb2.UndrainWorkerRequest(worker_id="w-fuzz"),),
        "RegisterWorker": (admin_pb2.RegisterWorkerRequest(address="127.0.0.1:1"),),
        "Dispatch": (
            worker_pb2.DispatchRequest(
                request_id="fz", prompt_token_ids=[1, 2], sampling=sampling, placement="GGGG"
            ),
        ),
        "DispatchBatch": (
            worker_pb2.DispatchBatchRequest(requests=[
                worker_pb2.DispatchRequest(request_id="fzb", prompt_token_ids=[1, 2], sampling=sampling,
                                           placement="GGGG"),
                worker_pb2.DispatchRequest(request_id="", prompt_token_ids=[1]),
            ]),
        ),
        "Abort": (worker_pb2.AbortRequest(request_id="fz"),),
        "ProfileWorker": (admin_pb2.ProfileWorkerRequest(worker_id="w-fuzz"),),
    }
    out: list[Rpc] = []
    for module, service, token, target in (
        (scheduler_pb2, "SchedulerService", API, "scheduler"),
        (admin_pb2, "AdminService", ADMIN, "scheduler"),
        (worker_pb2, "WorkerService", WORKER, "worker"),
    ):
        desc = module.DESCRIPTOR.services_by_name[service]
        for method in desc.methods:
            request_type = _message_class(method.input_type)
            out.append(Rpc(
                f"/{desc.full_name}/{method.name}", request_type, method.server_streaming,
                method.client_streaming, seeds.get(method.name, (request_type(),)), token, target,
            ))  # fmt: skip
    assert {r.path for r in out} == set(ALLOWED), "a new RPC needs its allowed statuses listed"
    return out


def _message_class(desc: pb_descriptor.Descriptor) -> type[pb_message.Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)  # type: ignore[no-any-return]


def _spec(name: str, params: dict[str, Any]) -> admin_pb2.PolicySpec:
    spec = admin_pb2.PolicySpec(name=name)
    spec.params.update(params)
    return spec


# --- message generators ---------------------------------------------------------------------------

_INTS = (0, 1, -1, 7, 255, 256, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1)
_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 1e300, -1e300, math.nan, math.inf, -math.inf)
_STRINGS = (
    "",
    "w-fuzz",
    "fuzz-1",
    "GGGG",
    "HHHH",
    "GHGX",
    "127.0.0.1:70000",
    "layerkv",
    "fcfs-full",
    "a" * 5000,
    "\x00\x01",
    "é☃𝄞",
    "../../etc",
    "%s%n",
    "g" * 129,
)


def _random_scalar(rng: random.Random, field: pb_descriptor.FieldDescriptor) -> Any:
    t = field.type
    if t == field.TYPE_STRING:
        if rng.random() < 0.5:
            return rng.choice(_STRINGS)
        return "".join(
            chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF))))
            for _ in range(rng.randrange(0, 40))
        )
    if t == field.TYPE_BYTES:
        return rng.randbytes(rng.randrange(0, 64))
    if t == field.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        value = rng.choice(_FLOATS) if rng.random() < 0.7 else rng.uniform(-10, 10)
        return value if t == field.TYPE_DOUBLE or not math.isfinite(value) or abs(value) < 1e38 else 1e38
    if t == field.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99])
    unsigned = t in (field.TYPE_UINT32, field.TYPE_UINT64, field.TYPE_FIXED32, field.TYPE_FIXED64)
    bits = (
        64
        if t
        in (field.TYPE_INT64, field.TYPE_UINT64, field.TYPE_SINT64, field.TYPE_FIXED64, field.TYPE_SFIXED64)
        else 32
    )
    lo, hi = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    value = rng.choice(_INTS) if rng.random() < 0.6 else rng.randrange(0, 600)
    return min(max(value, lo), hi)


def _fill(rng: random.Random, msg: pb_message.Message, depth: int = 0) -> None:
    """Set a random subset of ``msg``'s fields to random (often hostile) values."""
    if isinstance(msg, struct_pb2.Struct):
        for i in range(rng.randrange(0, 4)):
            msg.update(
                {
                    rng.choice(("skip_blocked", "allow_host_layers", f"k{i}", "")): rng.choice(
                        (True, 3, -1.5, "x", math.nan, math.inf, None, [1, "a"], {"n": 1})
                    )
                }
            )
        return
    for field in msg.DESCRIPTOR.fields:
        if rng.random() < 0.35:
            continue
        if field.type == field.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if field.is_repeated:
                for _ in range(rng.randrange(0, 3)):
                    _fill(rng, getattr(msg, field.name).add(), depth + 1)
            else:
                sub = getattr(msg, field.name)
                sub.SetInParent()
                _fill(rng, sub, depth + 1)
        elif field.is_repeated:
            n = rng.choice((0, 1, 3, 50, 3000))
            getattr(msg, field.name).extend(_random_scalar(rng, field) for _ in range(n))
        else:
            setattr(msg, field.name, _random_scalar(rng, field))


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # overwrite a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:  # insert junk
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randrange(1, 8))
        elif op == 3 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 4 and buf:  # repeat a slice
            i = rng.randrange(len(buf))
            buf[i:i] = buf[i : i + rng.randrange(1, 16)]
        else:  # append a field with a random number and wire type
            buf += bytes([(rng.randrange(1, 16) << 3) | rng.choice((0, 1, 2, 5, 3, 7))]) + rng.randbytes(
                rng.randrange(0, 9)
            )
    return bytes(buf)


def _payload(rng: random.Random, rpc: Rpc) -> tuple[bytes, str]:
    """A request and what kind it is."""
    roll = rng.random()
    if roll < 0.25:
        return rng.randbytes(rng.randrange(0, 80)), "random"
    if roll < 0.6:
        return _mutate(rng, rng.choice(rpc.seeds).SerializeToString()), "mutated"
    msg = rpc.request_type()
    msg.CopyFrom(rng.choice(rpc.seeds))
    _fill(rng, msg)
    return msg.SerializeToString(), "random-fields"


# --- the fleet --------------------------------------------------------------------------------------


@dataclass
class FuzzFleet:
    scheduler: SchedulerServer
    scheduler_port: int
    worker: WorkerServer


@pytest.fixture
async def fuzz_fleet(redis_url: str) -> AsyncIterator[FuzzFleet]:
    worker, worker_port = await create_worker(
        WorkerSettings.build(
            host="127.0.0.1", port=0, metrics_port=0, worker_id="w-fuzz", worker_token=WORKER
        ),
        engine=make_engine(gpu_blocks=96, host_blocks=96),
    )
    scheduler, port = await create_scheduler(SchedulerSettings.build(
        host="127.0.0.1", port=0, metrics_port=0, redis_url=redis_url, policy="fcfs-full",
        workers=[f"127.0.0.1:{worker_port}"], worker_token=WORKER, api_token=API, admin_token=ADMIN,
        worker_retry_s=0.2, queue_limit=64,
    ))  # fmt: skip
    await scheduler.core.pool.add_and_wait(f"127.0.0.1:{worker_port}", timeout_s=30)
    yield FuzzFleet(scheduler, port, worker)
    await scheduler.stop(0)
    await worker.stop(0)


async def _call(channel: grpc.aio.Channel, rpc: Rpc, payload: bytes, token: str) -> grpc.StatusCode:
    metadata = bearer_metadata(token)
    waits = rpc.streaming or rpc.path.endswith("/RegisterWorker")
    timeout = WAITING_TIMEOUT_S if waits else CALL_TIMEOUT_S
    try:
        if rpc.client_streaming:
            stream = channel.stream_stream(rpc.path)(iter([payload]), metadata=metadata, timeout=timeout)
            async for _ in stream:  # as below: the first message is enough
                stream.cancel()
                break
            return C.OK
        if rpc.streaming:
            call = channel.unary_stream(rpc.path)(payload, metadata=metadata, timeout=timeout)
            async for _ in call:  # the first message is enough: the stream works
                call.cancel()
                break
            return C.OK
        await channel.unary_unary(rpc.path)(payload, metadata=metadata, timeout=timeout)
        return C.OK
    except asyncio.CancelledError:
        return C.OK
    except grpc.aio.AioRpcError as err:
        return err.code()


async def test_fuzzed_messages_get_documented_statuses_and_bounded_logs(
    fuzz_fleet: FuzzFleet, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common import grpc_errors
    from common.logging_setup import RateLimitedLog

    # The production limiter (10 lines per 10 s), with a window of its own for this test.
    fresh = RateLimitedLog(grpc_errors.log, burst=10, window_s=10.0)
    monkeypatch.setattr(grpc_errors, "bad_input_log", fresh)
    caplog.set_level(logging.INFO)
    rng = random.Random(SEED)
    rpcs = _rpcs()
    channels = {
        "scheduler": grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_fleet.scheduler_port}"),
        "worker": grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_fleet.worker.port}"),
    }
    bad: list[str] = []
    counts: dict[str, int] = {}
    kinds: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        jobs: list[Callable[[], Any]] = []
        for _ in range(MESSAGES):
            rpc = rng.choice(rpcs)
            payload, kind = _payload(rng, rpc)
            token = rpc.token if rng.random() < 0.9 else rng.choice(("", "nope"))
            kinds[kind] = kinds.get(kind, 0) + 1

            async def job(
                rpc: Rpc = rpc, payload: bytes = payload, token: str = token, kind: str = kind
            ) -> None:
                code = await _call(channels[rpc.target], rpc, payload, token)
                counts[code.name] = counts.get(code.name, 0) + 1
                if code not in ALLOWED[rpc.path] or (code is not C.UNAUTHENTICATED and token != rpc.token):
                    bad.append(f"{rpc.path} {kind} token={token!r} -> {code.name} ({payload[:40]!r})")

            jobs.append(job)
        slots = asyncio.Semaphore(CONCURRENCY)

        async def bounded(job: Callable[[], Any]) -> None:
            async with slots:
                await job()

        await asyncio.gather(*(bounded(j) for j in jobs))
        elapsed = loop.time() - started
        assert not bad, f"{len(bad)} undocumented answers, e.g. {bad[:10]} (all: {counts})"
        assert counts.get("OK", 0) > 50 and counts.get("INVALID_ARGUMENT", 0) > 300, counts

        # Both services keep serving: a valid request succeeds on each afterwards.
        admin = channels["scheduler"]
        await admin.unary_unary("/layerkv.v1.AdminService/UndrainWorker")(
            admin_pb2.UndrainWorkerRequest(worker_id="w-fuzz").SerializeToString(),
            metadata=bearer_metadata(ADMIN),
        )
        await admin.unary_unary("/layerkv.v1.AdminService/SetPolicy")(
            admin_pb2.SetPolicyRequest(policy=_spec("fcfs-full", {})).SerializeToString(),
            metadata=bearer_metadata(ADMIN),
        )
        async with open_channel(f"127.0.0.1:{fuzz_fleet.worker.port}", token=WORKER) as ch:
            from common.proto.layerkv.v1 import worker_pb2_grpc

            described = await worker_pb2_grpc.WorkerServiceStub(ch).Describe(
                worker_pb2.DescribeRequest(), timeout=10
            )
            assert described.worker_id == "w-fuzz"
        from common.proto.layerkv.v1 import scheduler_pb2_grpc

        client = scheduler_pb2_grpc.SchedulerServiceStub(channels["scheduler"])
        request = scheduler_pb2.GenerateRequest(
            token_ids=scheduler_pb2.TokenIds(ids=[5, 6, 7]),
            sampling=types_pb2.SamplingParams(max_tokens=3, ignore_eos=True),
        )
        finals = [
            m.final
            async for m in client.Generate(request, metadata=bearer_metadata(API), timeout=120)
            if m.HasField("final")
        ]
        assert [f.output_tokens for f in finals] == [3]
    finally:
        for channel in channels.values():
            await channel.close(None)

    # Bounded logs: no tracebacks, no line per message; the edge's lines are rate-limited.
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records if r.exc_info][:3]
    edge = [r for r in records if r.name == "common.grpc_errors"]
    windows = elapsed / 10.0 + 1  # grpc_errors.bad_input_log: 10 lines per 10 s
    assert len(edge) <= 10 * windows + 5, (len(edge), elapsed)
    # Everything else at INFO and above comes from the valid admin calls among them (policy swaps,
    # drains): far fewer lines than messages.
    assert len(records) <= MESSAGES / 20, [r.getMessage() for r in records[:20]]
