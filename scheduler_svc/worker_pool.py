"""The worker registry and its clients: who the workers are, how to reach them, whether they live.

Workers come from configured addresses, from self-registration (``AdminService.RegisterWorker``)
or from a ``name:port`` DNS name re-resolved periodically (a Kubernetes headless Service lists one
address per pod). Each address gets one connection task: Describe + GetTokenizer, then the
StreamEvents stream, whose events go to the listener. The worker is *up* from its first event (the
subscription is live, so no event of a later dispatch can be missed) until the stream breaks;
then it is *down*, the listener requeues its requests, and the task redials after a pause. A
self-registered address that stays unreachable for ``registered_ttl_s`` is dropped (its worker
registers again when it is back); a streak of failed dials logs one warning, not one per retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import grpc.aio

from common.errors import LayerKVError, Unavailable
from common.grpc_errors import error_from_rpc
from common.proto.layerkv.v1 import worker_pb2, worker_pb2_grpc
from common.security import open_channel
from common.tokenizer import Tokenizer, tokenizer_from_wire
from common.types import CostModel, KVGeometry, TierCapacity
from common.wire import cost_model_from_proto, geometry_from_proto
from scheduler_svc.cost_fit import CostFitter

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),  # tokenizer.json of large models
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
# A worker sends its state at least every few seconds even when idle (a heartbeat); a stream
# silent for longer is a worker whose host vanished without closing the TCP connection. (HTTP/2
# keepalive pings would need every worker server to allow them: "too many pings" otherwise.)
EVENT_SILENCE_LIMIT_S = 15.0


@dataclass(frozen=True)
class ChannelSecurity:
    """How the scheduler dials workers (mutual TLS when ``ca`` is set)."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""
    token: str = ""  # bearer token sent on every call (the workers' --worker-token)


@dataclass(frozen=True)
class WorkerDescription:
    """What a worker said about itself on connect."""

    worker_id: str
    model: str
    geometry: KVGeometry
    capacity: TierCapacity
    cost_model: CostModel
    max_model_len: int
    eos_token_id: int
    staging_blocks: int = 0  # GPU staging blocks for host-placed layers (0: not reported)
    preemption_mode: str = ""  # the worker's default when a request cannot grow ("": not reported)
    max_num_batched_tokens: int = 0  # per-step token budget of chunked prefill (0: not reported)
    vocab_size: int = 0  # token ids a prompt may use are [0, vocab_size) (0: not reported)


@dataclass(eq=False)
class WorkerHandle:
    """One worker address and, once connected, its description, stub and health."""

    address: str
    registered: bool = False
    description: WorkerDescription | None = None
    tokenizer: Tokenizer | None = None
    stub: worker_pb2_grpc.WorkerServiceStub | None = None
    healthy: bool = False
    draining: bool = False
    removed: bool = False
    fitter: CostFitter | None = None
    last_running: tuple[worker_pb2.RunningRequest, ...] = ()  # from the latest event
    up: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        return self.description.worker_id if self.description else ""

    @property
    def accepting(self) -> bool:
        return self.healthy and not self.draining and not self.removed


class WorkerListener(Protocol):
    """What the scheduler core does with worker lifecycle and events."""

    async def worker_up(self, worker: WorkerHandle) -> None: ...

    async def worker_event(self, worker: WorkerHandle, event: worker_pb2.StreamEventsResponse) -> None: ...

    async def worker_down(self, worker: WorkerHandle) -> None: ...


def describe_from_proto(d: worker_pb2.DescribeResponse) -> WorkerDescription:
    return WorkerDescription(
        worker_id=d.worker_id,
        model=d.model,
        geometry=geometry_from_proto(d.geometry),
        capacity=TierCapacity(d.gpu_blocks, d.host_blocks),
        cost_model=cost_model_from_proto(d.cost_model),
        max_model_len=d.max_model_len,
        eos_token_id=d.eos_token_id,
        staging_blocks=d.staging_blocks,
        preemption_mode=d.preemption_mode,
        max_num_batched_tokens=d.max_num_batched_tokens,
        vocab_size=d.vocab_size,
    )


class WorkerPool:
    """All worker connections of one scheduler."""

    def __init__(
        self,
        listener: WorkerListener,
        security: ChannelSecurity,
        retry_s: float = 1.0,
        silence_limit_s: float = EVENT_SILENCE_LIMIT_S,
        registered_ttl_s: float = 60.0,
    ) -> None:
        self._silence_limit_s = silence_limit_s
        self._registered_ttl_s = registered_ttl_s
        # Called with the address of a registered worker the pool gave up on (drop it from Redis).
        self.on_drop: Callable[[str], Awaitable[None]] | None = None
        self._listener = listener
        self._security = security
        self._retry_s = retry_s
        self._by_address: dict[str, WorkerHandle] = {}
        self._dns_task: asyncio.Task[None] | None = None
        self._closing = False

    def handles(self) -> list[WorkerHandle]:
        return list(self._by_address.values())

    def by_id(self, worker_id: str) -> WorkerHandle | None:
        for handle in self._by_address.values():
            if handle.worker_id == worker_id and not handle.removed:
                return handle
        return None

    def add(self, address: str, registered: bool = False) -> WorkerHandle:
        """Start dialing ``address`` (idempotent)."""
        handle = self._by_address.get(address)
        if handle is None:
            handle = WorkerHandle(address, registered=registered)
            self._by_address[address] = handle
            handle.task = asyncio.create_task(self._run(handle), name=f"worker {address}")
        return handle

    async def add_and_wait(
        self, address: str, timeout_s: float = 10.0, registered: bool = False
    ) -> WorkerHandle:
        """``add`` and wait until the worker is up; ``Unavailable`` if it is not in time."""
        handle = self.add(address, registered)
        try:
            await asyncio.wait_for(handle.up.wait(), timeout_s)
        except asyncio.TimeoutError as exc:
            raise Unavailable(f"worker at {address} did not come up within {timeout_s:.0f} s") from exc
        return handle

    async def remove(self, address: str) -> None:
        handle = self._by_address.pop(address, None)
        if handle is None:
            return
        handle.removed = True
        if handle.task is not None:
            handle.task.cancel()
            # bounded: a channel that is slow to close must not hold up a shutdown
            await asyncio.wait({handle.task}, timeout=2.0)

    def start_dns(self, name_port: str, interval_s: float) -> None:
        self._dns_task = asyncio.create_task(self._resolve_loop(name_port, interval_s), name="workers-dns")

    async def close(self) -> None:
        """Stop dialing. Workers are not reported down: their requests stay "running" in Redis, and
        the next scheduler recovers them (a shutdown is not a worker failure)."""
        self._closing = True
        if self._dns_task is not None:
            self._dns_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dns_task
        for address in list(self._by_address):
            await self.remove(address)

    # ---- internals ----
    async def _resolve_loop(self, name_port: str, interval_s: float) -> None:
        name, _, port = name_port.rpartition(":")
        loop = asyncio.get_running_loop()
        dns_owned: set[str] = set()
        while True:
            try:
                infos = await loop.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
                found = {
                    f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos
                }
                for address in found - dns_owned:
                    log.info("workers-dns %s: new worker address %s", name_port, address)
                    self.add(address)
                for address in dns_owned - found:
                    log.info("workers-dns %s: address %s is gone", name_port, address)
                    await self.remove(address)
                dns_owned = found
            except OSError as exc:
                log.warning("workers-dns %s does not resolve: %s", name_port, exc)
            await asyncio.sleep(interval_s)

    async def _run(self, handle: WorkerHandle) -> None:
        failing_since: float | None = None  # start of the current streak of failed sessions
        while not handle.removed:
            channel = open_channel(
                handle.address,
                ca=self._security.ca,
                cert=self._security.cert,
                key=self._security.key,
                server_name=self._security.server_name,
                options=CHANNEL_OPTIONS,
                token=self._security.token,
            )
            problem = ""
            try:
                await self._session(handle, channel)
            except grpc.aio.AioRpcError as err:
                problem = str(error_from_rpc(err))
            except LayerKVError as exc:
                problem = str(exc)
            except Exception:  # a bug must not end the reconnect loop
                log.exception("worker %s: unexpected error", handle.address)
            finally:
                was_up = handle.healthy
                await self._mark_down(handle)
                await channel.close(None)
            now = time.monotonic()
            if was_up or failing_since is None:
                failing_since = now
                # An address a RegisterWorker call brought and that never answered: that caller got
                # the status, so a flood of bogus registrations does not flood the log.
                quiet = handle.registered and not was_up and handle.description is None
                if problem:
                    log.log(logging.DEBUG if quiet else logging.WARNING,
                            "worker %s: %s (redialling every %.1f s)", handle.address, problem, self._retry_s)
            elif problem:
                log.debug("worker %s: still unreachable: %s", handle.address, problem)
            if handle.registered and not handle.removed and now - failing_since >= self._registered_ttl_s:
                log.warning("worker %s: registered, but unreachable for %.0f s: dropped until it registers "
                            "again", handle.address, now - failing_since)
                await self._drop(handle)
                return
            if not handle.removed:
                await asyncio.sleep(self._retry_s)

    async def _drop(self, handle: WorkerHandle) -> None:
        handle.removed = True
        if self._by_address.get(handle.address) is handle:
            del self._by_address[handle.address]
        if self.on_drop is not None:
            try:
                await self.on_drop(handle.address)
            except Exception as exc:  # the registry entry stays; the next scheduler drops it again
                log.warning("worker %s: could not remove it from the registry: %s", handle.address, exc)

    async def _session(self, handle: WorkerHandle, channel: grpc.aio.Channel) -> None:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        description = describe_from_proto(await stub.Describe(worker_pb2.DescribeRequest(), timeout=10))
        if not description.worker_id:
            raise Unavailable(f"worker at {handle.address} describes itself without a worker_id")
        wire = await stub.GetTokenizer(worker_pb2.GetTokenizerRequest(), timeout=30)
        handle.tokenizer = tokenizer_from_wire(wire.kind, wire.tokenizer_json, wire.chat_template,
                                               wire.bos_token, wire.eos_token)
        handle.description = description
        handle.stub = stub
        if handle.fitter is None or handle.fitter.profile != description.cost_model:
            handle.fitter = CostFitter(description.cost_model)
        stream = stub.StreamEvents(worker_pb2.StreamEventsRequest())
        events = stream.__aiter__()
        first = True
        while True:
            try:
                event = await asyncio.wait_for(events.__anext__(), self._silence_limit_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError as exc:
                stream.cancel()
                raise Unavailable(
                    f"worker at {handle.address} sent no event for {self._silence_limit_s:.0f} s"
                ) from exc
            if self._closing:
                return
            if first:  # the subscription is live: dispatches from now on cannot lose an event
                first = False
                handle.healthy = True
                await self._listener.worker_up(handle)
                handle.up.set()
            await self._listener.worker_event(handle, event)
        raise Unavailable(f"worker {description.worker_id} at {handle.address} closed its event stream")

    async def _mark_down(self, handle: WorkerHandle) -> None:
        handle.up.clear()
        if handle.healthy:
            handle.healthy = False
            if not self._closing:
                await self._listener.worker_down(handle)
