"""An in-process fleet for tests and the overhead benchmark: stub workers + a real scheduler
server (real gRPC on free ports, real Redis), and a client channel with generated stubs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc.aio

from common.config import SchedulerSettings
from common.proto.layerkv.v1 import admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from common.security import bearer_metadata
from scheduler_svc.server import SchedulerServer, create_server
from scheduler_svc.testing.stub_worker import StubWorker

CLIENT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500))


@dataclass
class Fleet:
    """Started by ``start_fleet``; ``close()`` stops everything."""

    settings: SchedulerSettings
    workers: list[StubWorker]
    server: SchedulerServer
    port: int
    channel: grpc.aio.Channel
    client: scheduler_pb2_grpc.SchedulerServiceStub
    admin: admin_pb2_grpc.AdminServiceStub
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_workers_up(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while sum(h.healthy for h in self.server.core.pool.handles()) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{count} workers did not come up in {timeout_s} s")
            await asyncio.sleep(0.01)

    async def restart_scheduler(self) -> None:
        """Stop the scheduler and start a new one on the same port and Redis (a restart).

        The client channel stays open, as a real client's would: its calls fail with UNAVAILABLE
        and new calls reach the new scheduler.
        """
        await self.server.stop(0)
        settings = self.settings.model_copy(update={"port": self.port})
        self.server, self.port = await create_server(settings)
        await self.wait_workers_up(sum(1 for w in self.workers if w.port and w._server is not None))

    async def close(self) -> None:
        await self.channel.close(None)
        await self.server.stop(0)
        for worker in self.workers:
            await worker.stop()


async def start_fleet(redis_url: str, workers: list[StubWorker], **settings: Any) -> Fleet:
    for worker in workers:
        await worker.start()
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "redis_url": redis_url,
        "workers": [w.address for w in workers],
        "policy": "fcfs-full",
        "worker_retry_s": 0.2,
    }
    values.update(settings)
    config = SchedulerSettings.build(**values)
    server, port = await create_server(config)
    # Quick reconnects: a test restarts the scheduler and expects clients back within a second.
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)
    fleet = Fleet(
        config,
        workers,
        server,
        port,
        channel,
        scheduler_pb2_grpc.SchedulerServiceStub(channel),
        admin_pb2_grpc.AdminServiceStub(channel),
    )
    await fleet.wait_workers_up(len(workers))
    return fleet


def generate_request(
    prompt: list[int], max_tokens: int, request_id: str = ""
) -> scheduler_pb2.GenerateRequest:
    from common.proto.layerkv.v1 import types_pb2

    return scheduler_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=scheduler_pb2.TokenIds(ids=prompt),
        sampling=types_pb2.SamplingParams(max_tokens=max_tokens),
    )


async def collect(stream: Any) -> tuple[list[int], Any]:
    """All token ids of a Generate/Attach stream and its final message (checks offsets are contiguous)."""
    tokens: list[int] = []
    final = None
    async for response in stream:
        if response.HasField("chunk"):
            assert response.chunk.offset == len(tokens), (response.chunk.offset, len(tokens))
            tokens.extend(response.chunk.token_ids)
        else:
            final = response.final
    return tokens, final


def admin_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return bearer_metadata(token)
