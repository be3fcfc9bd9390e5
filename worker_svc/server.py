"""The worker process: engine + engine thread + WorkerService on grpc.aio, health, reflection, metrics.

``create_server(settings)`` builds everything and starts serving; it returns the running
``WorkerServer`` and its bound port (port 0 picks a free one, which the tests use). ``serve`` is
the ``layerkv worker`` entry point: it runs until SIGINT/SIGTERM, then stops gracefully (no new
calls, streams ended, the engine thread joined). When ``--scheduler`` is given the worker
registers itself with that scheduler and re-registers periodically (a restarted scheduler with a
wiped registry finds it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.config import WorkerSettings
from common.cost_profile import describe_cost
from common.grpc_errors import ErrorInterceptor
from common.metrics import start_metrics_server
from common.proto.layerkv.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from common.security import AccessGuard, AccessRule, add_port, bearer_metadata, open_channel, warn_if_insecure
from worker_svc import wire
from worker_svc.engine_thread import EngineThread
from worker_svc.events import EventHub
from worker_svc.metrics import WorkerMetrics
from worker_svc.service import WorkerIdentity, WorkerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
REREGISTER_S = 30.0  # re-announce to the scheduler this often once registered
_RETRY_MAX_S = 5.0


def build_engine(settings: WorkerSettings) -> Any:
    """The engine the settings describe (imports torch: only the worker process calls this)."""
    from worker_svc.engine_factory import engine_from_settings

    return engine_from_settings(settings)


class WorkerServer:
    """A running worker: the gRPC server and everything it owns, stopped in reverse order."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        thread: EngineThread,
        servicer: WorkerServicer,
        health_servicer: Any,  # grpc_health.v1.health.aio.HealthServicer
        metrics: WorkerMetrics,
        worker_id: str,
    ) -> None:
        self.server = server
        self.port = port
        self.thread = thread
        self.servicer = servicer
        self.health = health_servicer
        self.metrics = metrics
        self.worker_id = worker_id
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics_port = 0  # bound /metrics port, 0 when disabled

    async def stop(self, grace: float | None = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.health.enter_graceful_shutdown()
        self.servicer.stop_streams()
        await self.server.stop(grace)
        await asyncio.to_thread(self.thread.stop)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def create_server(settings: WorkerSettings, engine: Any = None) -> tuple[WorkerServer, int]:
    """Start a worker on ``settings.host:settings.port``; ``engine`` (tests) skips building one."""
    loop = asyncio.get_running_loop()
    if engine is None:
        engine = await asyncio.to_thread(build_engine, settings)

    # Every WorkerService call (Describe and GetTokenizer included) is checked before it is decoded:
    # the worker answers only its scheduler when a token or a certificate name is configured.
    guard = AccessGuard({SERVICE_NAME: AccessRule(settings.worker_token, settings.scheduler_identity)})
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=[ErrorInterceptor(guard)])
    port = add_port(server, f"{settings.host}:{settings.port}", settings.tls)
    worker_id = settings.resolved_worker_id(port)
    metrics = WorkerMetrics(worker_id)
    usage = engine.usage()  # before the thread starts: the only engine call off that thread
    metrics.observe_usage(usage)
    hub = EventHub(wire.state_to_proto(usage, ()))
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]

    def on_step(out: Any) -> None:
        hub.publish(wire.step_to_proto(out))
        metrics.observe_step(out)

    background: set[asyncio.Future[None]] = set()  # keeps the health updates alive until done

    def on_error(exc: BaseException) -> None:
        log.error("engine failed, worker %s is no longer serving: %s", worker_id, exc)
        servicer.stop_streams()  # the scheduler sees the worker down and requeues its requests
        for name in ("", SERVICE_NAME):
            background.add(asyncio.ensure_future(
                health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            ))

    thread = EngineThread(engine, loop, on_step, on_error)
    identity = WorkerIdentity(
        worker_id=worker_id,
        model=str(getattr(engine, "model_name", settings.model)),
        device=str(getattr(engine, "device", settings.device)),
        dtype=str(getattr(engine, "dtype", settings.dtype)),
    )
    servicer = WorkerServicer(identity, engine, thread, hub, metrics, lease_s=settings.scheduler_lease_s)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    thread.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    warn_if_insecure(f"worker {worker_id}", settings.tls, {}, mutual_expected=True)
    if not settings.worker_token and not settings.scheduler_identity:
        log.warning("SECURITY: worker %s has neither --worker-token nor --scheduler-identity: any peer "
                    "that reaches its port may read every request's tokens, dispatch and abort", worker_id)
    elif settings.tls.enabled and not settings.scheduler_identity:
        log.warning("SECURITY: worker %s has no --scheduler-identity: any peer with a certificate "
                    "signed by the CA and the worker token may dispatch", worker_id)

    running = WorkerServer(server, port, thread, servicer, health_servicer, metrics, worker_id)
    if settings.metrics_port:
        running.metrics_port = start_metrics_server(settings.metrics_port, metrics.registry, settings.host)
    if settings.scheduler:
        running._tasks.append(asyncio.create_task(_register_loop(settings, port, worker_id)))
    log.info("worker %s serving %s on port %d", worker_id, identity.model, port)
    profile = getattr(engine, "cost_profile", None)
    if profile is not None:
        how = {"default": "defaults, --profile off", "file": f"loaded from {settings.profile_file}"}.get(
            profile.info.source.value, f"measured in {profile.info.duration_s:.2f} s")
        log.info("worker %s cost model (%s): %s", worker_id, how, describe_cost(profile.cost_model))
    return running, port


async def _register_loop(settings: WorkerSettings, port: int, worker_id: str) -> None:
    """Announce this worker to its scheduler until cancelled; retry with backoff when it is away."""
    address = settings.resolved_advertise_address(port)
    tls = settings.tls
    channel = open_channel(settings.scheduler, ca=tls.ca, cert=tls.cert if tls.ca else "",
                           key=tls.key if tls.ca else "")
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    delay = 0.2
    announced = False
    failing = False  # one warning per streak of failures, not one per retry
    try:
        while True:
            try:
                await stub.RegisterWorker(
                    admin_pb2.RegisterWorkerRequest(address=address),
                    metadata=bearer_metadata(settings.admin_token),
                    timeout=10,
                )
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                log.log(logging.DEBUG if failing else logging.WARNING,
                        "worker %s: registering with %s failed (%s): retrying with backoff", worker_id,
                        settings.scheduler, code)
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            if not announced or failing:
                log.info("worker %s registered with scheduler %s as %s", worker_id, settings.scheduler,
                         address)
                announced = True
            failing = False
            delay = 0.2
            await asyncio.sleep(REREGISTER_S)
    finally:
        await channel.close(None)


async def _serve_until_signal(settings: WorkerSettings) -> None:
    running, port = await create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"layerkv worker {running.worker_id} ready on port {port}", flush=True)
    await stop.wait()
    log.info("worker %s stopping", running.worker_id)
    await running.stop(grace=5.0)


def serve(settings: WorkerSettings) -> None:
    """Run a worker until SIGINT/SIGTERM (the ``layerkv worker`` command)."""
    import uvloop

    uvloop.run(_serve_until_signal(settings))
