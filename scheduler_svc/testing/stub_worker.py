"""A torch-free WorkerService that emits deterministic tokens: the scheduler's tests and its
overhead benchmark drive real gRPC against it.

Each step appends one token to every running request. The next token is a pure function of the
request's whole context (prompt plus tokens so far), so a request regenerated elsewhere from its
prompt plus the tokens already streamed continues exactly as it would have (``expected_tokens``).
Blocks are counted like the engine does (``stub_kv``): a dispatch takes its prompt's blocks in
every layer in the tier the placement names (refused with RESOURCE_EXHAUSTED when they do not fit,
or while preempted requests wait), decode grows on demand, and a step whose growth does not fit
preempts (recompute, or swap-layers when the dispatch asks), reported as the engine reports it.
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
from common.kv_budget import BlockDemand
from common.proto.layerkv.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from common.security import TLSFiles, add_port
from common.tokenizer import ByteTokenizer
from common.types import KVGeometry, Placement
from common.wire import dispatch_error_to_proto, geometry_to_proto
from scheduler_svc.testing.stub_kv import StepCounts, StubKV, StubRequest

HEARTBEAT_S = 1.0  # an idle stub sends its state this often
MAX_NUM_BATCHED_TOKENS = 2048  # reported as the engine's default token budget (the stub never chunks)
PREEMPTION_MODES = frozenset({"", "recompute", "swap-layers"})
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
    preemption_mode: str = "recompute"  # for dispatches that leave DispatchRequest.preemption empty
    modes: dict[str, str] = field(default_factory=dict)  # DispatchRequest.preemption, as sent
    d2h_bytes_per_s: float = 1e9  # described link: slow enough, and layerkv keeps layers on the GPU
    batches: list[int] = field(default_factory=list)  # the size of each DispatchBatch call, in order

    def __post_init__(self) -> None:
        self.kv = StubKV(self.geometry, self.gpu_blocks, self.host_blocks)
        self._admitted: list[str] = []
        self._finished: list[worker_pb2.TokenUpdate] = []
        self._subscribers: list[asyncio.Queue[worker_pb2.StreamEventsResponse | None]] = []
        self._server: grpc.aio.Server | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._work = asyncio.Event()  # set by Dispatch and Abort: an idle stub waits on it
        self._step = 0
        self._order = 0
        self.tokenizer = ByteTokenizer()

    # ---- lifecycle ----
    async def start(self, port: int = 0) -> int:
        self.kv.gpu_blocks, self.kv.host_blocks = self.gpu_blocks, self.host_blocks  # set before start
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
        return list(self.kv.running)

    @property
    def waiting_ids(self) -> list[str]:
        return [r.request_id for r in self.kv.waiting]

    @property
    def preempted(self) -> list[str]:
        """Every preemption so far, in order (an id repeats when preempted again)."""
        return self.kv.preempted

    def used(self) -> BlockDemand:
        return self.kv.used()

    @property
    def gpu_free(self) -> int:
        return self.kv.gpu_free

    @property
    def host_free(self) -> int:
        return self.kv.host_free

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
                d2h_bytes_per_s=self.d2h_bytes_per_s,
                h2d_bytes_per_s=1e9,
                prefill_per_token_s=1e-5,
                decode_base_s=self.step_s,
                correction=1.0,
            ),
            max_model_len=self.max_model_len,
            eos_token_id=self.tokenizer.eos_token_id or 0,
            device="cpu",
            dtype="float32",
            preemption_mode=self.preemption_mode,
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        )

    async def GetTokenizer(
        self, request: worker_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetTokenizerResponse:
        kind, payload = self.tokenizer.to_wire()
        return worker_pb2.GetTokenizerResponse(kind=kind, tokenizer_json=payload)

    async def DispatchBatch(
        self, request: worker_pb2.DispatchBatchRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.DispatchBatchResponse:
        """Each request through ``Dispatch`` (a test's override of it too), in order, answered at
        its position."""
        self.batches.append(len(request.requests))
        results = []
        for item in request.requests:
            try:
                taken = await self.Dispatch(item, context)
            except Exception as exc:
                results.append(dispatch_error_to_proto(exc))
                continue
            results.append(worker_pb2.DispatchResult(
                status=worker_pb2.DISPATCH_STATUS_ACCEPTED, gpu_blocks=taken.gpu_blocks,
                host_blocks=taken.host_blocks,
            ))  # fmt: skip
        return worker_pb2.DispatchBatchResponse(results=results)

    async def Dispatch(
        self, request: worker_pb2.DispatchRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.DispatchResponse:
        if self.refuse_next > 0:
            self.refuse_next -= 1
            self.refused += 1
            await asyncio.sleep(self.refuse_delay_s)
            raise ResourceExhausted(f"no room for {request.request_id} (told to refuse it)")
        rid = request.request_id
        if self.kv.holds(rid):
            raise InvalidArgument(f"request {rid!r} is already running here")
        if not request.prompt_token_ids:
            raise InvalidArgument("empty prompt")
        if request.preemption not in PREEMPTION_MODES:
            raise InvalidArgument(
                f"preemption must be one of {sorted(PREEMPTION_MODES)}, got {request.preemption!r}"
            )
        placement = Placement.from_letters(request.placement, self.geometry.num_layers)
        self._order += 1
        r = StubRequest(
            rid,
            list(request.prompt_token_ids),
            request.sampling.max_tokens or 16,
            frozenset(request.sampling.stop_token_ids),
            placement,
            request.preemption or self.preemption_mode,
            self._order,
            held_tokens=len(request.prompt_token_ids),
            dispatched_placement=placement,
        )
        need = r.blocks(self.geometry)
        if self.kv.waiting or not self.kv.fits(need):  # preempted requests go first, as in the engine
            self.refused += 1
            raise ResourceExhausted(
                f"no room for {rid}: needs {need.gpu_blocks} GPU and {need.host_blocks} host blocks, "
                f"{self.gpu_free} and {self.host_free} free, {len(self.kv.waiting)} preempted waiting"
            )
        self.kv.running[rid] = r
        self.modes[rid] = request.preemption
        self._admitted.append(rid)
        self.dispatched.append(rid)
        self._work.set()
        return worker_pb2.DispatchResponse(gpu_blocks=need.gpu_blocks, host_blocks=need.host_blocks)

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        rid = request.request_id
        if not self.kv.remove(rid):
            return worker_pb2.AbortResponse(aborted=False)
        self.aborted.append(rid)
        self._finished.append(
            worker_pb2.TokenUpdate(request_id=rid, finished=True, finish_reason=types_pb2.FINISH_REASON_ABORT)
        )
        self._work.set()
        return worker_pb2.AbortResponse(aborted=True)

    async def StreamEvents(
        self, request: worker_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.StreamEventsResponse]:
        queue: asyncio.Queue[worker_pb2.StreamEventsResponse | None] = asyncio.Queue()
        self._subscribers.append(queue)
        queue.put_nowait(self._event([], StepCounts(), "idle"))  # the current state first, as the engine
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._subscribers.remove(queue)

    # ---- the step loop ----
    def _busy(self) -> bool:
        return bool(self.kv.running or self.kv.waiting or self._admitted or self._finished)

    async def _step_loop(self) -> None:
        while True:
            if not self._busy():
                # Idle: wait for work (or send the state-only heartbeat, as the real worker does)
                # instead of waking every step_s: a 1 ms tick costs an idle stub CPU the
                # benchmark's other processes need.
                self._work.clear()
                try:
                    async with asyncio.timeout(HEARTBEAT_S):
                        await self._work.wait()
                except TimeoutError:
                    for queue in self._subscribers:
                        queue.put_nowait(self._event([], StepCounts(), "idle"))
                    continue
            await asyncio.sleep(self.step_s)  # the step's time
            if not self._busy():
                continue
            event = self.step()
            for queue in self._subscribers:
                queue.put_nowait(event)

    def step(self) -> worker_pb2.StreamEventsResponse:
        """One engine step: re-admit preempted requests, grow each running one, emit a token each."""
        self._step += 1
        counts = StepCounts()
        updates = list(self._finished)
        self._finished.clear()
        self.kv.readmit(counts)  # recompute: the whole context is prefilled again, oldest first
        decoding = 0
        for r in list(self.kv.running.values()):
            if r.request_id not in self.kv.running or not self.kv.grow(r, counts):
                continue  # preempted in this step
            decoding += 1
            token = next_token(r.context)
            r.context.append(token)
            r.generated += 1
            r.decode_time_s += self.step_s
            done = r.generated >= r.max_tokens or token in r.stop_ids
            reason = types_pb2.FINISH_REASON_STOP if token in r.stop_ids else types_pb2.FINISH_REASON_LENGTH
            updates.append(
                worker_pb2.TokenUpdate(
                    request_id=r.request_id,
                    token_ids=[token],
                    finished=done,
                    finish_reason=reason if done else types_pb2.FINISH_REASON_UNSPECIFIED,
                )
            )
            if done:
                del self.kv.running[r.request_id]
        kind = "decode" if not counts.prefill_tokens else ("mixed" if decoding else "prefill")
        event = self._event(updates, counts, kind, decoding)
        self._admitted = []
        return event

    def _event(
        self, updates: list[worker_pb2.TokenUpdate], counts: StepCounts, kind: str, decoding: int = 0
    ) -> worker_pb2.StreamEventsResponse:
        used = self.used()
        return worker_pb2.StreamEventsResponse(
            tokens=updates,
            running=[
                worker_pb2.RunningRequest(
                    request_id=r.request_id,
                    tokens_generated=r.generated,
                    decode_time_s=r.decode_time_s,
                    context_tokens=len(r.context),
                    placement=r.placement.letters,
                )
                for r in self.kv.running.values()
            ],
            gpu=types_pb2.TierUsage(
                total_blocks=self.gpu_blocks,
                free_blocks=self.gpu_blocks - used.gpu_blocks,
                used_blocks_per_layer=used.gpu_per_layer,
            ),
            host=types_pb2.TierUsage(
                total_blocks=self.host_blocks,
                free_blocks=self.host_blocks - used.host_blocks,
                used_blocks_per_layer=used.host_per_layer,
            ),
            step=worker_pb2.StepReport(
                step=self._step,
                kind=kind,
                duration_s=self.step_s,
                num_tokens=counts.prefill_tokens if kind == "prefill" else decoding,
                num_prefill_tokens=counts.prefill_tokens,
                num_decode_requests=decoding,
                num_preemptions=counts.preemptions,
                num_swapped_layers=counts.swapped_layers,
            ),
            admitted_request_ids=self._admitted,
            waiting_request_ids=self.waiting_ids,
            preempted_request_ids=counts.preempted,
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
