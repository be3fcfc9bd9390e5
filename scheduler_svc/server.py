"""The scheduler's gRPC server: SchedulerService and AdminService over ``SchedulerCore``, plus
standard health checking and server reflection, bearer tokens and TLS from the settings.
The servicers only translate: every call is checked (tokens) and decoded by the ``ErrorInterceptor``
before it reaches them, and their errors become status codes there.

``create_server(settings)`` builds and starts everything and returns ``(server, port)``;
``server.stop(grace)`` stops it in reverse order (RPCs, scheduling, workers, Redis).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from common.config import SchedulerSettings
from common.cost_profile import describe_cost
from common.errors import InvalidArgument, NotFound, Unavailable, quoted
from common.grpc_errors import ErrorInterceptor
from common.metrics import ServiceMetrics, start_metrics_server
from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from common.security import AccessGuard, AccessRule, add_port, warn_if_insecure
from common.store import Store, WorkerEntry
from scheduler_svc.admission import lookup, submit
from scheduler_svc.core import SchedulerCore
from scheduler_svc.fleet_view import CoreFleetView
from scheduler_svc.gc_tuning import tune_gc
from scheduler_svc.multiplex import StreamLimits, StreamSession
from scheduler_svc.openai_api.server import http_server
from scheduler_svc.policies.base import Policy
from scheduler_svc.policies.registry import describe_policies, policy_params
from scheduler_svc.policy_file import PolicyFileWatcher
from scheduler_svc.requests import StreamChunk, StreamFinal, stored_stream
from scheduler_svc.wire import final_from_record, request_info, worker_info

log = logging.getLogger(__name__)

SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name




class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, core: SchedulerCore, stream_limits: StreamLimits | None = None) -> None:
        self.core = core
        self.stream_limits = stream_limits or StreamLimits()  # per GenerateStream call (backpressure)
        self.streams: set[StreamSession] = set()  # the GenerateStream calls open now

    async def Generate(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        admitted = await submit(self.core, request)
        request_id = admitted.state.request_id
        async for item in self._events(request_id, 0, final_with_tokens=request.final_with_tokens):
            yield scheduler_pb2.GenerateResponse(request_id=request_id, **item)

    async def GenerateStream(
        self,
        requests: AsyncIterator[scheduler_pb2.GenerateStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[scheduler_pb2.GenerateStreamResponse]:
        session = StreamSession(self.core, self._events, self.stream_limits, context)
        self.streams.add(session)
        try:
            async for response in session.run(requests):
                yield response
        finally:
            self.streams.discard(session)

    async def Attach(
        self, request: scheduler_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.AttachResponse]:
        async for item in self._events(request.request_id, request.offset):
            yield scheduler_pb2.AttachResponse(request_id=request.request_id, **item)

    async def _events(
        self, request_id: str, offset: int, final_with_tokens: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """The stream's messages; with ``final_with_tokens``, a chunk the final follows at once (the
        finish was saved with it) rides in the final's ``last_chunk`` instead: one message fewer
        per request, and a one-commit request is one message."""
        state = await lookup(self.core, request_id)
        if state is None:
            raise NotFound(f"unknown request id {quoted(request_id)}")
        tokenizer = self._tokenizer()
        if offset > state.sampling.max_tokens:
            raise InvalidArgument(f"offset {offset} is past max_tokens ({state.sampling.max_tokens})")
        live = self.core.requests.get(request_id) is state
        items = (
            self.core.stream(state, offset, tokenizer)
            if live
            else _iterate(stored_stream(state.record, state.tokens, offset, tokenizer))
        )
        held: StreamChunk | None = None  # the last chunk, for the final to carry
        async for item in items:
            if isinstance(item, StreamChunk):
                if held is not None:  # only the detokenizer's held-back text follows a held chunk
                    item = StreamChunk(
                        held.offset, held.token_ids + item.token_ids, held.text_delta + item.text_delta
                    )
                    held = None
                # Closed with nothing after this chunk: stream_from yields the final next, at once.
                last = item.offset + len(item.token_ids) >= len(state.tokens)
                if final_with_tokens and state.closed and last:
                    held = item
                    continue
                yield {"chunk": _token_chunk(item)}
            else:
                assert isinstance(item, StreamFinal)
                final = final_from_record(item.record)
                if held is not None:
                    final.last_chunk.CopyFrom(_token_chunk(held))
                yield {"final": final}

    def _tokenizer(self) -> Any:
        return next((h.tokenizer for h in self.core.pool.handles() if h.tokenizer is not None), None)

    async def Cancel(
        self, request: scheduler_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.CancelResponse:
        return scheduler_pb2.CancelResponse(cancelled=await self.core.cancel(request.request_id))

    async def GetRequest(
        self, request: scheduler_pb2.GetRequestRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetRequestResponse:
        state = await lookup(self.core, request.request_id)
        if state is None:
            raise NotFound(f"unknown request id {quoted(request.request_id)}")
        return scheduler_pb2.GetRequestResponse(request=request_info(state.record, len(state.tokens)))


def _token_chunk(item: StreamChunk) -> scheduler_pb2.TokenChunk:
    return scheduler_pb2.TokenChunk(offset=item.offset, token_ids=item.token_ids, text_delta=item.text_delta)


async def _iterate(items: list[StreamChunk | StreamFinal]) -> AsyncIterator[StreamChunk | StreamFinal]:
    for item in items:
        yield item


def policy_spec(policy: Policy) -> admin_pb2.PolicySpec:
    spec = admin_pb2.PolicySpec(name=policy.name)
    spec.params.update(policy_params(policy))
    return spec


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: SchedulerCore) -> None:
        self.core = core

    async def ListPolicies(
        self, request: admin_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListPoliciesResponse:
        out = admin_pb2.ListPoliciesResponse()
        for d in describe_policies():
            info = out.policies.add(
                name=d.name, description=d.description, params_schema_json=d.params_schema_json
            )
            info.defaults.update(d.defaults)
        return out

    async def GetPolicy(
        self, request: admin_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetPolicyResponse:
        return admin_pb2.GetPolicyResponse(policy=policy_spec(self.core.policy))

    async def SetPolicy(
        self, request: admin_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetPolicyResponse:
        if not request.policy.name:
            raise InvalidArgument("SetPolicy needs a policy name")
        params = _params_of(request.policy.params) if request.policy.HasField("params") else {}
        previous, current = await self.core.set_policy(request.policy.name, _integral(params))
        return admin_pb2.SetPolicyResponse(previous=policy_spec(previous), current=policy_spec(current))

    async def ListWorkers(
        self, request: admin_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListWorkersResponse:
        return admin_pb2.ListWorkersResponse(workers=[self._info(h) for h in self.core.pool.handles()])

    def _info(self, handle: Any) -> admin_pb2.WorkerInfo:
        running = sorted(
            s.request_id
            for s in self.core.requests.values()
            if s.record.status == "running" and s.record.worker_id == handle.worker_id and handle.worker_id
        )
        return worker_info(handle, self.core.ledger.get(handle.worker_id), running)

    def _worker(self, worker_id: str) -> Any:
        handle = self.core.pool.by_id(worker_id)
        if handle is None:
            raise NotFound(f"unknown worker id {quoted(worker_id)}")
        return handle

    async def DrainWorker(
        self, request: admin_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DrainWorkerResponse:
        handle = self._worker(request.worker_id)
        handle.draining = True
        log.info("worker %s is draining", request.worker_id)
        return admin_pb2.DrainWorkerResponse(worker=self._info(handle))

    async def UndrainWorker(
        self, request: admin_pb2.UndrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UndrainWorkerResponse:
        handle = self._worker(request.worker_id)
        if handle.draining:
            handle.draining = False
            log.info("worker %s accepts dispatches again", request.worker_id)
            self.core.wake()  # waiting requests may fit it now
        return admin_pb2.UndrainWorkerResponse(worker=self._info(handle))

    async def ProfileWorker(
        self, request: admin_pb2.ProfileWorkerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ProfileWorkerResponse:
        handle = self._worker(request.worker_id)
        connection = handle.connection
        if not handle.healthy or connection is None:
            raise Unavailable(f"worker {quoted(request.worker_id)} is down: it cannot be profiled now")
        # The worker refuses (FAILED_PRECONDITION) unless idle; it is the one that knows.
        profile = await connection.profile()
        if handle.connection is connection and handle.description is not None:  # still that session
            handle.adopt_profile(profile)
        log.info("worker %s re-profiled in %.2f s: %s", request.worker_id, profile.info.duration_s,
                 describe_cost(profile.cost_model))
        return admin_pb2.ProfileWorkerResponse(worker=self._info(handle))

    async def RegisterWorker(
        self, request: admin_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RegisterWorkerResponse:
        address = check_worker_address(request.address)
        pool = self.core.pool
        known = any(h.address == address for h in pool.handles())
        remaining = context.time_remaining()
        timeout_s = 10.0 if remaining is None else max(0.0, min(10.0, remaining - 0.05))
        try:
            handle = await pool.add_and_wait(address, timeout_s=timeout_s, registered=True)
        except Unavailable:
            if not known:  # nobody answers there: do not keep dialling an address we never reached
                await pool.remove(address)
            raise
        await self.core.store.put_worker(WorkerEntry(handle.worker_id, address, registered=True))
        return admin_pb2.RegisterWorkerResponse(worker_id=handle.worker_id)


MAX_ADDRESS_CHARS = 261  # a 253-character DNS name, ':' and a port; [IPv6] fits too


def check_worker_address(address: str) -> str:
    """``address`` when it is ``host:port`` with a port in 1..65535, else ``InvalidArgument``."""
    host, sep, port = address.rpartition(":")
    problem = ""
    if len(address) > MAX_ADDRESS_CHARS:
        problem = f"is longer than {MAX_ADDRESS_CHARS} characters"
    elif not sep or not host:
        problem = "must be host:port"
    elif not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        problem = "must end in a port number 1..65535"
    elif any(c.isspace() or not c.isprintable() or c in "/@?#" for c in host):
        problem = "has a host with spaces, control or URL characters"
    if problem:
        raise InvalidArgument(f"worker address {quoted(address)} {problem}")
    return address


def _params_of(params: struct_pb2.Struct) -> dict[str, Any]:
    """Struct → dict; a NaN or infinite number is refused naming the parameter (JSON has neither)."""

    def check(value: struct_pb2.Value, path: str) -> None:
        kind = value.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(value.number_value):
            raise InvalidArgument(
                f"policy parameter {path} must be a finite number, got {value.number_value}"
            )
        if kind == "struct_value":
            for key, inner in value.struct_value.fields.items():
                check(inner, f"{path}.{key}")
        elif kind == "list_value":
            for i, inner in enumerate(value.list_value.values):
                check(inner, f"{path}[{i}]")

    for key, value in params.fields.items():
        check(value, quoted(key))
    return dict(json_format.MessageToDict(params))


def _integral(params: dict[str, Any]) -> dict[str, Any]:
    """Struct numbers are doubles: give integral values back their int type for pydantic."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        out[key] = int(value) if isinstance(value, float) and value.is_integer() else value
    return out


class SchedulerServer:
    """A running scheduler: gRPC server, core, policy-file watcher, metrics endpoint."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics("scheduler")
        self.store = Store(settings.redis_url, settings.redis_prefix, settings.retention_s)
        self.core = SchedulerCore(settings, self.store, self.metrics)
        self.metrics.bind(CoreFleetView(self.core, settings.served_model_name))
        self.health = health_aio.HealthServicer()
        guard = AccessGuard({
            ADMIN_SERVICE: AccessRule(settings.admin_token),
            SCHEDULER_SERVICE: AccessRule(settings.api_token),
        })
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor(guard)])
        self.core.pool.on_drop = self.store.remove_worker  # a registered worker the pool gave up on
        self.servicer = SchedulerServicer(
            self.core, StreamLimits(settings.stream_outbox_events, settings.stream_stall_timeout_s)
        )
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(self.servicer, self.server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.core), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SCHEDULER_SERVICE,
                ADMIN_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.watcher = PolicyFileWatcher(self.core, settings.policy_file, settings.policy_file_interval_s)
        self.http = http_server(settings, self.core)  # the OpenAI-compatible API, when asked for
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._stopping = False
        self._health_tasks: set[asyncio.Task[None]] = set()  # referenced until done

    async def start(self) -> int:
        s = self.settings
        warn_if_insecure("scheduler", s.tls, {ADMIN_SERVICE: s.admin_token}, mutual_expected=False)
        if not s.tls_ca:
            log.warning("SECURITY: scheduler dials workers WITHOUT mutual TLS (no --tls-ca)")
        await self.core.start()
        self.watcher.start()
        self.port = add_port(self.server, s.listen_address, s.tls)
        await self.server.start()
        await self._set_health(self.store.reachable)
        # NOT_SERVING while Redis is unreachable (requests cannot be saved), SERVING once it is back.
        loop = asyncio.get_running_loop()
        def follow(reachable: bool) -> None:
            task = loop.create_task(self._set_health(reachable))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

        self.store.on_reachability(follow)
        self.metrics_port = start_metrics_server(s.metrics_port, self.metrics.registry, s.host)
        if self.http is not None:
            self.http_port = await self.http.start()
        log.info("scheduler listening on %s:%d (policy %s)", s.host, self.port, self.core.policy.name)
        return self.port

    async def _set_health(self, serving: bool) -> None:
        if self._stopping:
            return
        reply = health_pb2.HealthCheckResponse
        status = reply.SERVING if serving else reply.NOT_SERVING
        for service in ("", SCHEDULER_SERVICE, ADMIN_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Freeze the state first (no more rounds, no more worker events), then end the RPCs: what
        Redis holds at that moment is exactly what the next scheduler recovers."""
        await self.health.enter_graceful_shutdown()
        await self.watcher.stop()
        await self.core.stop()
        if self.http is not None:
            await self.http.stop(grace)
        await self.server.stop(grace)
        await self.store.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def create_server(settings: SchedulerSettings) -> tuple[SchedulerServer, int]:
    """Build and start a scheduler; the port is the bound one (settings.port 0 → a free port)."""
    server = SchedulerServer(settings)
    port = await server.start()
    return server, port


def struct_of(params: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(params)
    return out


async def serve(settings: SchedulerSettings) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully (the ``layerkv scheduler`` command)."""
    import signal

    server, _ = await create_server(settings)
    tune_gc()  # a process of its own: start-up's objects are the scheduler's, freezing them is safe
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("scheduler stopping")
    await server.stop(5.0)
