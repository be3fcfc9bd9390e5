"""A torch-free WorkerService that emits deterministic tokens: the scheduler's tests and its
overhead benchmark drive real gRPC against it.

Each step appends one token to every running request. The next token is a pure function of the
request's whole context (prompt plus tokens so far), so a request regenerated elsewhere from its
prompt plus the tokens already streamed continues exactly as it would have (``expected_tokens``).
Blocks are counted like the engine does: prompt plus ``max_tokens`` in every layer, in the tier the
placement names; a dispatch that does not fit is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from common.errors import InvalidArgument, ResourceExhausted
from common.grpc_errors import ErrorInterceptor
from common.proto.layerkv.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from common.security import TLSFiles, add_port
from common.tokenizer import ByteTokenizer
from common.types import KVGeometry, Placement, Tier
from common.wire import geometry_to_proto

HEARTBEAT_S = 1.0  # an idle stub sends its state this often
STUB_GEOMETRY = KVGeometry(num_layers=4, num_kv_heads=1, head_dim=8, block_size=4, dtype_bytes=4)


def next_token(context: Sequence[int]) -> int:
    """The stub model: a deterministic byte that depends on the whole context."""
    return (sum(context) * 31 + len(context) * 7) % 95 + 32  # printable ASCII, never EOS


def expected_tokens(prompt: Sequence[int], n: int) -> list[int]:
    """What the stub generates for ``prompt`` with ``max_tokens=n`` (no stop tokens)."""
    context = list(prompt)
    out: list[int] = []
    for _ in range(n):
        token = next_token(context)
        context.append(token)
        out.append(token)
    return out


@dataclass
class _Running:
    request_id: str
    context: list[int]
    max_tokens: int
    stop_ids: frozenset[int]
    placement: str
    gpu_per_layer: int
    host_per_layer: int
    generated: int = 0
    decode_time_s: float = 0.0


@dataclass
class StubWorker(worker_pb2_grpc.WorkerServiceServicer):
    """A fake worker; ``start()`` serves it on a free port of 127.0.0.1."""

    worker_id: str = "stub"
    gpu_blocks: int = 256
    host_blocks: int = 256
    step_s: float = 0.002  # pause between steps (how fast tokens come)
    geometry: KVGeometry = STUB_GEOMETRY
    max_model_len: int = 4096
    tls: TLSFiles = field(default_factory=TLSFiles)
    port: int = 0
    dispatched: list[str] = field(default_factory=list)  # worker-side ids, in order
    refused: int = 0
    aborted: list[str] = field(default_factory=list)
    refuse_next: int = 0  # refuse this many dispatches as if full (a stale ledger), each after...
    refuse_delay_s: float = 0.0  # ...this long

    def __post_init__(self) -> None:
        self._running: dict[str, _Running] = {}
        self._used_gpu = [0] * self.geometry.num_layers
        self._used_host = [0] * self.geometry.num_layers
        self._admitted: list[str] = []
        self._finished: list[worker_pb2.TokenUpdate] = []
        self._subscribers: list[asyncio.Queue[worker_pb2.StreamEventsResponse | None]] = []
        self._server: grpc.aio.Server | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._step = 0
        self.tokenizer = ByteTokenizer()

    # ---- lifecycle ----
    async def start(self, port: int = 0) -> int:
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self, server)
        self.port = add_port(server, f"127.0.0.1:{port}", self.tls)
        await server.start()
        self._server = server
        self._loop_task = asyncio.create_task(self._step_loop())
        return self.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Die: close every stream and the port (running requests are lost, as in a crash)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for queue in self._subscribers:
            queue.put_nowait(None)
        if self._server is not None:
            await self._server.stop(None)
        self._server = None

    @property
    def running_ids(self) -> list[str]:
        return list(self._running)

    @property
    def gpu_free(self) -> int:
        return self.gpu_blocks - sum(self._used_gpu)

    # ---- WorkerService ----
    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.DescribeResponse:
        return worker_pb2.DescribeResponse(
            worker_id=self.worker_id,
            model="stub",
            geometry=geometry_to_proto(self.geometry),
            gpu_blocks=self.gpu_blocks,
            host_blocks=self.host_blocks,
            cost_model=types_pb2.CostModel(
                d2h_bytes_per_s=1e9,
                h2d_bytes_per_s=1e9,
                prefill_per_token_s=1e-5,
                decode_base_s=self.step_s,
                correction=1.0,
            ),
            max_model_len=self.max_model_len,
            eos_token_id=self.tokenizer.eos_token_id or 0,
            device="cpu",
            dtype="float32",
        )

    async def GetTokenizer(
        self, request: worker_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetTokenizerResponse:
        kind, payload = self.tokenizer.to_wire()
        return worker_pb2.GetTokenizerResponse(kind=kind, tokenizer_json=payload)

    async def Dispatch(
        self, request: worker_pb2.DispatchRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.DispatchResponse:
        if self.refuse_next > 0:
            self.refuse_next -= 1
            self.refused += 1
            await asyncio.sleep(self.refuse_delay_s)
            raise ResourceExhausted(f"no room for {request.request_id} (told to refuse it)")
        if request.request_id in self._running:
            raise InvalidArgument(f"request {request.request_id!r} is already running here")
        if not request.prompt_token_ids:
            raise InvalidArgument("empty prompt")
        placement = Placement.from_letters(request.placement, self.geometry.num_layers)
        max_tokens = request.sampling.max_tokens or 16
        per_layer = self.geometry.blocks_for(len(request.prompt_token_ids) + max_tokens)
        need_gpu = per_layer * placement.gpu_layers
        need_host = per_layer * placement.host_layers
        if need_gpu > self.gpu_free or need_host > self.host_blocks - sum(self._used_host):
            self.refused += 1
            raise ResourceExhausted(f"no room for {request.request_id}: needs {need_gpu} GPU blocks")
        for layer, tier in enumerate(placement.tiers):
            if tier is Tier.GPU:
                self._used_gpu[layer] += per_layer
            else:
                self._used_host[layer] += per_layer
        self._running[request.request_id] = _Running(
            request.request_id,
            list(request.prompt_token_ids),
            max_tokens,
            frozenset(request.sampling.stop_token_ids),
            placement.letters,
            per_layer if placement.gpu_layers else 0,
            per_layer if placement.host_layers else 0,
        )
        self._admitted.append(request.request_id)
        self.dispatched.append(request.request_id)
        return worker_pb2.DispatchResponse(gpu_blocks=need_gpu, host_blocks=need_host)

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        running = self._running.get(request.request_id)
        if running is None:
            return worker_pb2.AbortResponse(aborted=False)
        self._free(running)
        self.aborted.append(request.request_id)
        self._finished.append(
            worker_pb2.TokenUpdate(
                request_id=running.request_id, finished=True, finish_reason=types_pb2.FINISH_REASON_ABORT
            )
        )
        return worker_pb2.AbortResponse(aborted=True)

    async def StreamEvents(
        self, request: worker_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.StreamEventsResponse]:
        queue: asyncio.Queue[worker_pb2.StreamEventsResponse | None] = asyncio.Queue()
        self._subscribers.append(queue)
        queue.put_nowait(self._event([]))  # the current state first, as the real worker does
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._subscribers.remove(queue)

    # ---- the step loop ----
    def _free(self, running: _Running) -> None:
        del self._running[running.request_id]
        placement = Placement.from_letters(running.placement, self.geometry.num_layers)
        for layer, tier in enumerate(placement.tiers):
            if tier is Tier.GPU:
                self._used_gpu[layer] -= running.gpu_per_layer
            else:
                self._used_host[layer] -= running.host_per_layer

    async def _step_loop(self) -> None:
        idle_steps = 0
        while True:
            await asyncio.sleep(self.step_s)
            if not (self._running or self._admitted or self._finished):
                idle_steps += 1
                if idle_steps * self.step_s >= HEARTBEAT_S:  # state-only heartbeat, as the real worker
                    idle_steps = 0
                    for queue in self._subscribers:
                        queue.put_nowait(self._event([]))
                continue
            idle_steps = 0
            self._step += 1
            updates = list(self._finished)
            self._finished.clear()
            for running in list(self._running.values()):
                token = next_token(running.context)
                running.context.append(token)
                running.generated += 1
                running.decode_time_s += self.step_s
                done = running.generated >= running.max_tokens or token in running.stop_ids
                reason = (
                    types_pb2.FINISH_REASON_STOP
                    if token in running.stop_ids
                    else types_pb2.FINISH_REASON_LENGTH
                )
                updates.append(
                    worker_pb2.TokenUpdate(
                        request_id=running.request_id,
                        token_ids=[token],
                        finished=done,
                        finish_reason=reason if done else types_pb2.FINISH_REASON_UNSPECIFIED,
                    )
                )
                if done:
                    self._free(running)
            event = self._event(updates)
            self._admitted = []
            for queue in self._subscribers:
                queue.put_nowait(event)

    def _event(self, updates: list[worker_pb2.TokenUpdate]) -> worker_pb2.StreamEventsResponse:
        return worker_pb2.StreamEventsResponse(
            tokens=updates,
            running=[
                worker_pb2.RunningRequest(
                    request_id=r.request_id,
                    tokens_generated=r.generated,
                    decode_time_s=r.decode_time_s,
                    context_tokens=len(r.context),
                    placement=r.placement,
                )
                for r in self._running.values()
            ],
            gpu=types_pb2.TierUsage(
                total_blocks=self.gpu_blocks, free_blocks=self.gpu_free, used_blocks_per_layer=self._used_gpu
            ),
            host=types_pb2.TierUsage(
                total_blocks=self.host_blocks,
                free_blocks=self.host_blocks - sum(self._used_host),
                used_blocks_per_layer=self._used_host,
            ),
            step=worker_pb2.StepReport(
                step=self._step, kind="decode", duration_s=self.step_s, num_tokens=len(self._running)
            ),
            admitted_request_ids=self._admitted,
        )


async def _serve(ports: list[int], step_s: float, gpu_blocks: int, host_blocks: int) -> None:
    import signal

    workers = [
        StubWorker(f"stub-{i}", gpu_blocks=gpu_blocks, host_blocks=host_blocks, step_s=step_s)
        for i in range(len(ports))
    ]
    for worker, port in zip(workers, ports, strict=True):
        await worker.start(port)
    print(" ".join(w.address for w in workers), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for worker in workers:
        await worker.stop()


def main() -> None:
    """``python -m scheduler_svc.testing.stub_worker --ports 50061,50062``: stub workers in one process."""
    import argparse

    import uvloop

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ports", required=True, help="comma-separated ports, one stub worker each")
    parser.add_argument("--step-s", type=float, default=0.002, help="pause between steps")
    parser.add_argument("--gpu-blocks", type=int, default=1 << 20)
    parser.add_argument("--host-blocks", type=int, default=1 << 20)
    args = parser.parse_args()
    ports = [int(p) for p in args.ports.split(",")]
    uvloop.run(_serve(ports, args.step_s, args.gpu_blocks, args.host_blocks))


if __name__ == "__main__":
    main()
