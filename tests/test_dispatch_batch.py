"""The scheduler's calls into workers: one dispatch call per worker per round (``DispatchBatch`` on
the stub over real gRPC, each request answered as ``Dispatch`` would answer it alone), the
connection's fallback to ``Dispatch`` for a worker without it, message-size chunking, the core
settling each outcome of a batch as it settles a single dispatch (taken, refused and retried,
rejected and ended, unknown and rerun), and the event stream's silence watchdog."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest

from common.types import FinishReason, SamplingParams
from scheduler_svc.policies.base import PreemptionMode
from scheduler_svc.requests import WAITING, RequestState, StreamFinal
from scheduler_svc.testing.fleet import collect, generate_request, start_fleet
from scheduler_svc.testing.stub_kv import StepCounts
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens
from scheduler_svc.worker_client import (
    MAX_BATCH_TOKENS,
    BatchWorkerClient,
    ChannelSecurity,
    DispatchOutcomeUnknown,
    DispatchRefused,
    DispatchRejected,
    WorkerConnection,
    chunks,
)
from scheduler_svc.worker_events import DispatchCommand
from tests.test_core_without_grpc import OUTPUT, FakeWorkers, fake_core, stored_request


def command(rid: str, prompt: list[int], max_tokens: int = 4) -> DispatchCommand:
    return DispatchCommand(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens), max_tokens, "GGGG",
                           PreemptionMode.WORKER_DEFAULT)  # fmt: skip


async def test_a_batch_is_answered_item_by_item_as_dispatch_would(redis_url: str) -> None:
    worker = StubWorker("w0", gpu_blocks=16, host_blocks=16, step_s=0.01)
    await worker.start()
    connection = WorkerConnection(worker.address, ChannelSecurity())
    try:
        outcomes = await connection.dispatch_many([
            command("ok@0", [1, 2, 3]),
            command("empty@0", []),  # invalid: rejected, never taken
            command("big@0", [1] * 100),  # 25 blocks a layer: no room, refused
            command("ok@0", [1, 2, 3]),  # already running there: rejected
            command("also@0", [4, 5]),
        ])  # fmt: skip
        assert outcomes[0] is None and outcomes[4] is None
        assert isinstance(outcomes[1], DispatchRejected) and "empty prompt" in str(outcomes[1])
        assert isinstance(outcomes[2], DispatchRefused) and "no room" in str(outcomes[2])
        assert isinstance(outcomes[3], DispatchRejected) and "already running" in str(outcomes[3])
        assert worker.batches == [5] and worker.dispatched == ["ok@0", "also@0"]
        assert sorted(worker.running_ids) == ["also@0", "ok@0"]
    finally:
        await connection.close()
        await worker.stop()


class OldWorker(StubWorker):
    """A worker from before DispatchBatch: the call is UNIMPLEMENTED there."""

    async def DispatchBatch(self, request, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


async def test_a_worker_without_dispatch_batch_gets_one_dispatch_each(redis_url: str) -> None:
    worker = OldWorker("w0", step_s=0.005)
    fleet = await start_fleet(redis_url, [worker])
    try:
        results = await asyncio.wait_for(asyncio.gather(
            *(collect(fleet.client.Generate(generate_request([i + 1, 2], 5))) for i in range(6))
        ), 20)  # fmt: skip
        for i, (tokens, final) in enumerate(results):
            assert tokens == expected_tokens([i + 1, 2], 5) and final.output_tokens == 5
        assert len(worker.dispatched) == 6 and worker.batches == []
    finally:
        await fleet.close()


def test_batches_are_cut_to_fit_a_message() -> None:
    small, half = command("a@0", [1] * 10), command("b@0", [1] * (MAX_BATCH_TOKENS // 2))
    assert chunks([]) == []
    assert [len(c) for c in chunks([small] * 5)] == [5]
    assert [len(c) for c in chunks([half, half, small, half])] == [2, 2]
    huge = command("h@0", [1] * (MAX_BATCH_TOKENS + 1))  # alone, as a Dispatch of it would go
    assert [len(c) for c in chunks([small, huge, small])] == [1, 1, 1]


class BatchFakeWorkers(FakeWorkers):
    """The fake worker answering a round's dispatches in one call, with scripted outcomes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.script: dict[str, Exception] = {}  # worker-side id -> its outcome, once

    async def dispatch_many(self, worker_id: str, commands):  # type: ignore[no-untyped-def]
        self.calls.append([c.worker_request_id for c in commands])
        outcomes: list[Exception | None] = []
        for c in commands:
            error = self.script.pop(c.worker_request_id, None)
            if error is None:
                await self.dispatch(worker_id, c)
            outcomes.append(error)
        return outcomes


async def test_the_core_settles_each_outcome_of_a_round_sent_at_once(redis_url: str) -> None:
    fake = BatchFakeWorkers()
    assert isinstance(fake, BatchWorkerClient)
    async with fake_core(redis_url, fake) as (core, store):
        await core.pool.add_and_wait("fake:1")
        fake.script = {"b@0": DispatchRefused("no room"), "c@0": DispatchRejected("bad prompt"),
                       "d@0": DispatchOutcomeUnknown("DEADLINE_EXCEEDED: late")}  # fmt: skip
        states = []
        for rid in "abcd":
            states.append(await stored_request(store, rid, [1, 2, 3], len(OUTPUT)))
        for state in states:  # no await between them: one round sees all four
            core.admit(state)
        async def final(state: RequestState) -> object:
            return [item async for item in core.stream(state, 0, None)][-1]

        finals = await asyncio.wait_for(asyncio.gather(*(final(s) for s in states)), 10)
        assert fake.calls[0] == ["a@0", "b@0", "c@0", "d@0"]  # the round's dispatches, one call
        a, b, c, d = (f.record for f in finals if isinstance(f, StreamFinal))
        assert (a.finish_reason, a.output_tokens) == (FinishReason.LENGTH.value, len(OUTPUT))
        assert (b.finish_reason, b.requeues) == (FinishReason.LENGTH.value, 0)  # refused: same attempt
        assert (c.finish_reason, c.error) == (FinishReason.ERROR.value, "bad prompt")
        assert (d.finish_reason, d.requeues) == (FinishReason.LENGTH.value, 1)  # a new attempt...
        assert "d@0" in fake.aborted  # ...and the one that may run there is aborted
        later = [rid for call in fake.calls[1:] for rid in call]
        assert "b@0" in later and "d@1" in later  # retried after the backoff; the new attempt
        assert await store.get_tokens("b") == list(OUTPUT)
        budget = core.ledger.get("fake-0")
        assert budget is not None and budget.num_requests == 0  # every reservation released


@pytest.mark.parametrize("n", [1, 3])
def test_chunks_keep_the_order(n: int) -> None:
    commands = [command(f"r{i}@0", [1] * (MAX_BATCH_TOKENS // 2 + 1)) for i in range(n)]
    assert [c for chunk in chunks(commands) for c in chunk] == commands


class SilentWorker(StubWorker):
    """Sends its state once, then nothing (a hung worker whose connection stays open)."""

    async def StreamEvents(self, request, context):  # type: ignore[no-untyped-def]
        yield self._event([], StepCounts(), "idle")
        await asyncio.Event().wait()


async def test_a_worker_silent_for_the_limit_is_marked_down_then_redialled(redis_url: str) -> None:
    worker = SilentWorker("w0")
    fleet = await start_fleet(redis_url, [worker], worker_silence_s=0.5, worker_retry_s=0.2)
    try:
        (handle,) = fleet.server.core.pool.handles()
        for _ in range(100):  # up on its first event...
            if handle.healthy:
                break
            await asyncio.sleep(0.01)
        assert handle.healthy
        started = time.monotonic()
        while handle.healthy:  # ...down once nothing came for the silence limit
            assert time.monotonic() - started < 5, "a silent worker was never marked down"
            await asyncio.sleep(0.02)
        assert time.monotonic() - started >= 0.3
        while not handle.healthy:  # the pool dials it again: up on its first event again
            assert time.monotonic() - started < 10
            await asyncio.sleep(0.02)
    finally:
        await fleet.close()


async def test_a_dispatch_whose_worker_goes_down_during_the_rounds_commit_is_not_sent(
    redis_url: str,
) -> None:
    fake = BatchFakeWorkers()
    async with fake_core(redis_url, fake) as (core, store):
        handle = await core.pool.add_and_wait("fake:1")
        commit = core.lifecycle.commit

        async def commit_then_lose_the_worker(batch):  # type: ignore[no-untyped-def]
            await commit(batch)
            if batch.running:  # the round's commit: the worker goes down before the send
                handle.healthy = False
                await core.intake.worker_down(handle)

        core.lifecycle.commit = commit_then_lose_the_worker  # type: ignore[method-assign]
        state = await stored_request(store, "r", [1, 2, 3], len(OUTPUT))
        core.admit(state)
        for _ in range(100):
            if state.record.requeues:
                break
            await asyncio.sleep(0.01)
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert fake.calls == [] and fake.dispatched == []  # the reserved attempt was never sent...
        assert (state.record.status, state.worker_request_id) == (WAITING, "r@1")  # ...it waits again
        assert list(core.queue) == ["r"]


async def test_a_consumer_held_up_longer_than_the_silence_limit_is_not_a_silent_worker(
    redis_url: str,
) -> None:
    """Silence counts only while waiting for the next event (a commit waiting out a Redis stall
    holds the consumer; the worker kept sending meanwhile)."""
    worker = StubWorker("w0", step_s=0.01)
    fleet = await start_fleet(redis_url, [worker], worker_silence_s=1.5)
    try:
        (handle,) = fleet.server.core.pool.handles()
        intake = fleet.server.core.intake
        event = intake.worker_event
        held = False

        async def slow_once(w, e):  # type: ignore[no-untyped-def]
            nonlocal held
            if e.tokens and not held:
                held = True
                await asyncio.sleep(2.5)
            await event(w, e)

        intake.worker_event = slow_once  # type: ignore[method-assign]
        tokens, _ = await asyncio.wait_for(
            collect(fleet.client.Generate(generate_request([3, 4], 40, request_id="held"))), 20
        )
        assert held and handle.healthy and tokens == expected_tokens([3, 4], 40)
        assert fleet.server.core.requests["held"].record.requeues == 0
    finally:
        await fleet.close()


class GatedBatchWorkers(BatchFakeWorkers):
    """Holds the first dispatch call until ``gate`` is set (a worker slow to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.in_flight = asyncio.Event()

    async def dispatch_many(self, worker_id: str, commands):  # type: ignore[no-untyped-def]
        if not self.calls:
            self.in_flight.set()
            await self.gate.wait()
        return await super().dispatch_many(worker_id, commands)


async def test_rounds_while_a_dispatch_call_is_in_flight_go_together_in_the_next_one(redis_url: str) -> None:
    fake = GatedBatchWorkers()
    async with fake_core(redis_url, fake) as (core, store):
        await core.pool.add_and_wait("fake:1")
        states = {rid: await stored_request(store, rid, [1, 2, 3], len(OUTPUT)) for rid in "abcde"}
        core.admit(states["a"])
        await asyncio.wait_for(fake.in_flight.wait(), 5)  # "a" is out, its call not answered yet
        for rid in "bcd":  # three more rounds (each admission wakes one)...
            core.admit(states[rid])
            for _ in range(50):
                if states[rid].record.status != WAITING:
                    break
                await asyncio.sleep(0.01)
        cancelled, _ = await core.lifecycle.cancel("c")  # ...one cancelled while it waits to be sent
        assert cancelled
        fake.gate.set()

        async def final(state: RequestState) -> object:
            return [item async for item in core.stream(state, 0, None)][-1]

        finals = await asyncio.wait_for(asyncio.gather(*(final(states[r]) for r in "abd")), 10)
        assert fake.calls == [["a@0"], ["b@0", "d@0"]]  # one call in flight, the rest in the next
        assert all(isinstance(f, StreamFinal) and f.record.output_tokens == len(OUTPUT) for f in finals)
        core.admit(states["e"])  # nothing in flight: a lone request goes at once
        await asyncio.wait_for(final(states["e"]), 10)
        assert fake.calls[-1] == ["e@0"]
        budget = core.ledger.get("fake-0")
        assert budget is not None and budget.num_requests == 0  # "c"'s reservation released too


class FinishingFirstWorkers(BatchFakeWorkers):
    """A worker whose steps outrun its answer: each request runs to its end, and its events reach
    the scheduler, before the dispatch call returns (a short request under load). With
    ``cancel_first``, the client cancels it while the call is out instead."""

    def __init__(self, core_of: list[object], cancel_first: bool = False) -> None:
        super().__init__()
        self.core_of = core_of
        self.cancel_first = cancel_first

    async def dispatch_many(self, worker_id: str, commands):  # type: ignore[no-untyped-def]
        self.calls.append([c.worker_request_id for c in commands])
        for c in commands:
            self.dispatched.append(c)
            if self.cancel_first:
                core = self.core_of[0]
                await core.cancel(c.worker_request_id.split("@")[0])  # type: ignore[attr-defined]
            else:
                await self._run(worker_id, c)  # every event, the finish included, before the answer
        return [None] * len(commands)


async def test_an_attempt_its_worker_finished_before_answering_is_not_aborted(redis_url: str) -> None:
    core_of: list[object] = []
    fake = FinishingFirstWorkers(core_of)
    async with fake_core(redis_url, fake) as (core, store):
        core_of.append(core)
        await core.pool.add_and_wait("fake:1")
        states = [await stored_request(store, rid, [1, 2, 3], len(OUTPUT)) for rid in "ab"]
        for state in states:
            core.admit(state)
        finals = await asyncio.wait_for(
            asyncio.gather(*(_last(core.stream(s, 0, None)) for s in states)), 10
        )
        assert all(isinstance(f, StreamFinal) and f.record.output_tokens == len(OUTPUT) for f in finals)
        await asyncio.sleep(0.05)  # an abort would be sent in the background
        assert fake.aborted == []  # the worker ended them itself: no Abort call for either


async def test_an_attempt_cancelled_while_its_dispatch_is_out_is_still_aborted(redis_url: str) -> None:
    core_of: list[object] = []
    fake = FinishingFirstWorkers(core_of, cancel_first=True)
    async with fake_core(redis_url, fake) as (core, store):
        core_of.append(core)
        await core.pool.add_and_wait("fake:1")
        state = await stored_request(store, "c", [1, 2, 3], len(OUTPUT))
        core.admit(state)
        final = await asyncio.wait_for(_last(core.stream(state, 0, None)), 10)
        assert isinstance(final, StreamFinal) and final.record.finish_reason == FinishReason.ABORT.value
        for _ in range(100):
            if fake.aborted.count("c@0") >= 2:
                break
            await asyncio.sleep(0.01)
        # once by the cancel, once more when the dispatch's answer came (the cancel's abort may
        # have reached the worker before the dispatch did)
        assert fake.aborted.count("c@0") == 2


async def _last(items):  # type: ignore[no-untyped-def]
    return [item async for item in items][-1]
