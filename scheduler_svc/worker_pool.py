"""The worker registry: who the workers are, how to reach them, whether they live.

Workers come from configured addresses, from self-registration (``AdminService.RegisterWorker``)
or from a ``name:port`` DNS name re-resolved periodically (a Kubernetes headless Service lists one
address per pod). Each address gets one connection task: a ``WorkerConnection`` (its calls live in
``worker_client.py``) describes the worker, fetches its tokenizer and subscribes to its typed
events, which go to the listener. The worker is *up* from its first event (the subscription is
live, so no event of a later dispatch can be missed) until the stream breaks; then it is *down*,
the listener requeues its requests, and the task redials after a pause. A self-registered address
that stays unreachable for ``registered_ttl_s`` is dropped (its worker registers again when it is
back); a streak of failed dials logs one warning, not one per retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from common.cost_profile import CostProfile
from common.errors import LayerKVError, Unavailable
from common.tokenizer import Tokenizer
from scheduler_svc.cost_fit import CostFitter
from scheduler_svc.worker_client import ChannelSecurity, WorkerConnection
from scheduler_svc.worker_events import WorkerDescription, WorkerEvent

log = logging.getLogger(__name__)

# A worker sends its state at least every few seconds even when idle (a heartbeat); a stream
# silent for longer is a worker whose host vanished without closing the TCP connection. (HTTP/2
# keepalive pings would need every worker server to allow them: "too many pings" otherwise.)
EVENT_SILENCE_LIMIT_S = 15.0


@dataclass(eq=False)
class WorkerHandle:
    """One worker address and, once connected, its description, connection and health."""

    address: str
    registered: bool = False
    description: WorkerDescription | None = None
    tokenizer: Tokenizer | None = None
    connection: WorkerConnection | None = None  # of the latest session
    healthy: bool = False
    draining: bool = False
    removed: bool = False
    fitter: CostFitter | None = None
    up: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        return self.description.worker_id if self.description else ""

    @property
    def accepting(self) -> bool:
        return self.healthy and not self.draining and not self.removed

    def adopt_profile(self, profile: CostProfile) -> None:
        """The worker was re-profiled: describe it with the new cost model and restart the fit there."""
        assert self.description is not None, f"worker {self.address} re-profiled before describing itself"
        self.description = replace(self.description, cost_model=profile.cost_model, profile=profile.info)
        self.fitter = CostFitter(profile.cost_model)


class WorkerListener(Protocol):
    """What the scheduler core does with worker lifecycle and (typed) events."""

    async def worker_up(self, worker: WorkerHandle) -> None: ...

    async def worker_event(self, worker: WorkerHandle, event: WorkerEvent) -> None: ...

    async def worker_down(self, worker: WorkerHandle) -> None: ...


class WorkerRegistry(Protocol):
    """What the core and the servicers use of the pool (``WorkerPool``, or a fake in tests)."""

    on_drop: Callable[[str], Awaitable[None]] | None

    def handles(self) -> list[WorkerHandle]: ...

    def by_id(self, worker_id: str) -> WorkerHandle | None: ...

    def add(self, address: str, registered: bool = False) -> WorkerHandle: ...

    async def add_and_wait(
        self, address: str, timeout_s: float = 10.0, registered: bool = False
    ) -> WorkerHandle: ...

    async def remove(self, address: str) -> None: ...

    def start_dns(self, name_port: str, interval_s: float) -> None: ...

    async def close(self) -> None: ...


# Builds the registry that reports to the given listener (the core passes itself).
RegistryFactory = Callable[[WorkerListener], WorkerRegistry]


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
            connection = WorkerConnection(handle.address, self._security)
            problem = ""
            try:
                await self._session(handle, connection)
            except LayerKVError as exc:
                problem = str(exc)
            except Exception:  # a bug must not end the reconnect loop
                log.exception("worker %s: unexpected error", handle.address)
            finally:
                was_up = handle.healthy
                await self._mark_down(handle)
                await connection.close()
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

    async def _session(self, handle: WorkerHandle, connection: WorkerConnection) -> None:
        description = await connection.describe()
        if not description.worker_id:
            raise Unavailable(f"worker at {handle.address} describes itself without a worker_id")
        handle.tokenizer = await connection.tokenizer()
        handle.description = description
        handle.connection = connection
        if handle.fitter is None or handle.fitter.profile != description.cost_model:
            handle.fitter = CostFitter(description.cost_model)
        first = True
        events = connection.events(description.geometry.num_layers, self._silence_limit_s)
        async with contextlib.aclosing(events):
            async for event in events:
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
