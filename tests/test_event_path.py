"""The lean event path: one worker message per engine step for all its requests, one Redis commit
for it, and each client stream gets one message per step holding all its new tokens.

Worker side: ``worker_svc.wire.step_to_proto`` and the ``EventHub`` turn one ``StepOutput`` into one
``StreamEventsResponse``. Scheduler side: a ``SchedulerCore`` (no gRPC, a real redis-server) fed one
``WorkerEvent`` for several requests saves it in one commit and each stream yields one chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from common.config import SchedulerSettings
from common.metrics import ServiceMetrics
from common.proto.layerkv.v1 import worker_pb2
from common.store import RequestRecord, Store, StoreBatch
from common.types import FinishReason, Placement, SamplingParams
from scheduler_svc.core import SchedulerCore
from scheduler_svc.requests import WAITING, RequestState, StreamChunk, StreamFinal
from scheduler_svc.testing.stub_worker import STUB_GEOMETRY
from scheduler_svc.worker_events import RunningReport, TierReport, TokenUpdate, WorkerEvent
from tests.test_core_without_grpc import GPU_BLOCKS, FakeWorkers
from worker_svc import wire as worker_wire
from worker_svc.events import EventHub
from worker_svc.outputs import KVUsage, RequestOutput, RunningState, StepOutput, StepStats, TierUsage


def step_output(step: int, tokens: dict[str, tuple[int, ...]]) -> StepOutput:
    usage = TierUsage(8, 4, (1, 1, 1, 1))
    return StepOutput(
        outputs=tuple(
            RequestOutput(rid, ids, tuple(0.0 for _ in ids), False, None) for rid, ids in tokens.items()
        ),
        admitted=(),
        running=tuple(RunningState(rid, step, 0.01 * step, 10 + step, "GGGG") for rid in tokens),
        stats=StepStats(step, "decode", 0.01, len(tokens), 0, 0, 0.0, num_decode_requests=len(tokens)),
        usage=KVUsage(usage, usage),
    )


async def test_a_worker_step_is_one_message_for_all_its_requests() -> None:
    hub = EventHub(worker_pb2.StreamEventsResponse())
    queue = hub.subscribe()
    assert queue.get_nowait() is not None  # the current state, sent to every new subscriber
    for step in (1, 2):
        hub.publish(worker_wire.step_to_proto(step_output(step, {"a@0": (5,), "b@0": (6, 7), "c@0": (8,)})))
    messages = [queue.get_nowait() for _ in range(queue.qsize())]
    assert len(messages) == 2  # one per step, not one per request or per token
    for step, message in enumerate(messages, start=1):
        assert message is not None and message.step.step == step
        assert {u.request_id: list(u.token_ids) for u in message.tokens} == {
            "a@0": [5], "b@0": [6, 7], "c@0": [8]
        }
        assert [r.request_id for r in message.running] == ["a@0", "b@0", "c@0"]


class Steps(FakeWorkers):
    """A fake worker whose steps the test sends: the dispatches are only recorded."""

    async def dispatch(self, worker_id: str, command):  # type: ignore[no-untyped-def]
        self.dispatched.append(command)


@pytest.mark.asyncio
async def test_one_step_is_one_commit_and_one_chunk_per_client(redis_url: str) -> None:
    settings = SchedulerSettings.build(redis_url=redis_url, workers=["fake:1"], policy="fcfs-full",
                                       metrics_port=0, port=0, host="127.0.0.1")
    store = Store(settings.redis_url, settings.redis_prefix, settings.retention_s)
    commits: list[int] = []  # batches per commit call that carried tokens
    original = store.commit_many

    async def counted(batches: Sequence[StoreBatch], *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(b.tokens for b in batches):
            commits.append(len(batches))
        return await original(batches, *args, **kwargs)

    store.commit_many = counted  # type: ignore[method-assign]
    fake = Steps()
    core = SchedulerCore(settings, store, ServiceMetrics("scheduler"), client=fake, pool=fake.bind)
    await core.start()
    try:
        handle = await core.pool.add_and_wait("fake:1")
        ids = ["a", "b", "c"]
        states = []
        for rid in ids:
            now = time.time()
            record = RequestRecord(request_id=rid, status=WAITING, prompt_ids=[1, 2, 3],
                                   sampling={"max_tokens": 4}, arrival_time=now)
            assert await store.create_request(record, now)
            states.append(RequestState(record, SamplingParams(max_tokens=4)))
            core.admit(states[-1])
        for _ in range(200):
            if len(fake.dispatched) == len(ids):
                break
            await asyncio.sleep(0.01)
        assert sorted(c.worker_request_id for c in fake.dispatched) == ["a@0", "b@0", "c@0"]

        streams = [core.stream(state, 0, None) for state in states]
        placement = Placement.all_gpu(STUB_GEOMETRY.num_layers)
        gpu = TierReport(GPU_BLOCKS, GPU_BLOCKS - 6, (6,) * STUB_GEOMETRY.num_layers)
        for step, finished in ((1, False), (2, True)):
            # One step of the worker: two new tokens for each of the three requests.
            tokens = {f"{rid}@0": (10 * step + i, 10 * step + i + 1) for i, rid in enumerate(ids)}
            event = WorkerEvent(
                tokens=tuple(
                    TokenUpdate(wid, new, finished, FinishReason.LENGTH if finished else None)
                    for wid, new in tokens.items()
                ),
                running=() if finished else tuple(
                    RunningReport(wid, placement, 0.0, 3 + 2 * step, 2 * step) for wid in tokens
                ),
                gpu=gpu,
                admitted=tuple(tokens) if step == 1 else (),
            )
            commits.clear()
            await core.worker_event(handle, event)
            assert commits == [1]  # the whole step in one commit
            for stream, (wid, new) in zip(streams, tokens.items(), strict=True):
                chunk = await asyncio.wait_for(anext(stream), 5)
                # all the step's tokens of this request in one message, saved before it was sent
                assert isinstance(chunk, StreamChunk) and chunk.token_ids == new, (wid, chunk)
                assert (await store.get_tokens(wid.split("@")[0]))[chunk.offset :] == list(new)
        for stream in streams:
            assert isinstance(await asyncio.wait_for(anext(stream), 5), StreamFinal)
    finally:
        await core.stop()
        await store.close()


@pytest.mark.asyncio
async def test_a_request_with_an_id_of_ours_is_saved_in_its_dispatch_commit(redis_url: str) -> None:
    """No create call of its own: the record rides the round's commit, in front of the dispatch
    (a lone request makes one Redis call before its dispatch instead of two)."""
    from common.proto.layerkv.v1 import scheduler_pb2, types_pb2
    from scheduler_svc.admission import submit

    settings = SchedulerSettings.build(redis_url=redis_url, workers=["fake:1"], policy="fcfs-full",
                                       metrics_port=0, port=0, host="127.0.0.1")
    store = Store(settings.redis_url, settings.redis_prefix, settings.retention_s)
    calls: list[list[tuple[list[str], list[str]]]] = []  # per commit call: (created, running) per batch
    original = store.commit_many

    async def counted(batches: Sequence[StoreBatch], *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append([([c[0] for c in b.created], sorted(b.running)) for b in batches])
        return await original(batches, *args, **kwargs)

    async def no_create(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("an id of ours needs no create call")

    store.commit_many = counted  # type: ignore[method-assign]
    store.create_request = no_create  # type: ignore[method-assign]
    fake = Steps()
    core = SchedulerCore(settings, store, ServiceMetrics("scheduler"), client=fake, pool=fake.bind)
    await core.start()
    try:
        await core.pool.add_and_wait("fake:1")
        calls.clear()
        request = scheduler_pb2.GenerateRequest(
            token_ids=scheduler_pb2.TokenIds(ids=[1, 2, 3]), sampling=types_pb2.SamplingParams(max_tokens=4)
        )
        admitted = await submit(core, request)
        rid = admitted.state.request_id
        for _ in range(200):
            if fake.dispatched:
                break
            await asyncio.sleep(0.01)
        assert [c.worker_request_id for c in fake.dispatched] == [f"{rid}@0"]
        assert calls[0] == [([rid], []), ([], [rid])]  # one call: the create, then the dispatch
        stored = await store.get_request(rid)
        assert stored is not None and stored.status == "running" and stored.prompt_ids == [1, 2, 3]
        assert stored.arrival_time == admitted.state.record.arrival_time
        cancelled, _ = await core.lifecycle.cancel(rid)
        assert cancelled and (await store.get_request(rid)).status == "finished"  # type: ignore[union-attr]
    finally:
        await core.stop()


def test_the_hub_state_is_the_latest_event_without_its_tokens() -> None:
    """The state a new subscriber (and a heartbeat) gets follows every published step, though it
    is built only when asked for."""
    hub = EventHub(worker_pb2.StreamEventsResponse(step=worker_pb2.StepReport(kind="idle")))
    assert hub.state.step.kind == "idle" and not hub.state.running
    hub.publish(worker_wire.step_to_proto(step_output(1, {"a@0": (5,)})))
    first = hub.state
    assert [r.request_id for r in first.running] == ["a@0"] and not first.tokens
    assert first.step.kind == "idle" and list(first.gpu.used_blocks_per_layer) == [1, 1, 1, 1]
    assert hub.state is first  # built once per published event
    hub.publish(worker_wire.step_to_proto(step_output(2, {"b@0": (6,), "c@0": (7,)})))
    assert [r.request_id for r in hub.state.running] == ["b@0", "c@0"]
    queue = hub.subscribe()  # the two buffered steps (nobody listened), then that state
    backlog = [queue.get_nowait() for _ in range(2)]
    assert [m.step.step for m in backlog if m is not None] == [1, 2]
    start = queue.get_nowait()
    assert start is not None and [r.request_id for r in start.running] == ["b@0", "c@0"] and not start.tokens
