"""The Redis store against a real redis-server: key schema, batched writes, retention TTL,
recovery listing, workers and policy, namespace isolation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common.errors import Unavailable
from common.store import RequestRecord, RetryPolicy, Store, StoreBatch, WorkerEntry, batch_tokens
from layerkv.testing.redis_server import RedisServer


def record(request_id: str, status: str = "waiting") -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        status=status,
        prompt_ids=[1, 2, 3],
        sampling={
            "max_tokens": 8,
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": 0,
            "seed": None,
            "stop_token_ids": [],
            "ignore_eos": False,
        },
        tpot_slo_s=0.05,
        arrival_time=100.0,
    )


@pytest.fixture
async def store(redis_url: str):
    store = Store(redis_url, prefix="t1", retention_s=60)
    yield store
    await store.close()


async def test_create_is_idempotent_and_round_trips(store: Store) -> None:
    assert await store.create_request(record("a"), 1.0)
    assert not await store.create_request(record("a", status="running"), 2.0)  # the first one stays
    got = await store.get_request("a")
    assert got == record("a")
    assert await store.get_request("missing") is None


async def test_a_create_in_a_batch_is_saved_first_and_never_overwrites(store: Store) -> None:
    batch = StoreBatch()
    batch.create(record("a"), 1.0)
    running = record("a", status="running")
    batch.update(running, "status")  # a later write of the same commit applies on top of it
    batch.dequeued.add("a")
    batch.running.add("a")
    await store.commit(batch)
    assert await store.get_request("a") == running
    assert await store.active_requests() == [running]  # listed once: dequeued, now running
    again = StoreBatch()
    again.create(record("a"), 2.0)  # a replay (or a taken id) keeps the stored record
    await store.commit(again)
    assert await store.get_request("a") == running
    assert not await store.create_request(record("a"), 3.0)  # the same record create_request sees


async def test_batch_commits_tokens_updates_and_queue_in_one_go(store: Store, redis_url: str) -> None:
    await store.create_request(record("a"), 1.0)
    await store.create_request(record("b"), 2.0)
    r = record("a")
    r.status, r.worker_id, r.placement = "running", "w0", "GHGH"
    batch = StoreBatch()
    batch.update(r, "status", "worker_id", "placement")
    batch.dequeued.add("a")
    batch.running.add("a")
    batch_tokens(batch, "a", [5, 6])
    batch_tokens(batch, "a", [7])
    await store.commit(batch)
    got = await store.get_request("a")
    assert got is not None and (got.status, got.worker_id, got.placement) == ("running", "w0", "GHGH")
    assert await store.get_tokens("a") == [5, 6, 7]
    assert await store.get_tokens("a", offset=2) == [7]
    active = await store.active_requests()
    assert [x.request_id for x in active] == ["b", "a"]  # waiting in queue order, then running
    raw = aioredis.from_url(redis_url, decode_responses=True)
    try:
        assert await raw.ttl(store.k_request("a")) == -1  # no TTL while unfinished
    finally:
        await raw.aclose()


async def test_finished_requests_expire_after_retention(store: Store, redis_url: str) -> None:
    await store.create_request(record("a"), 1.0)
    r = record("a", status="finished")
    batch = StoreBatch()
    batch.update(r, "status")
    batch_tokens(batch, "a", [1])
    batch.finished.add("a")
    await store.commit(batch)
    raw = aioredis.from_url(redis_url, decode_responses=True)
    try:
        assert 0 < await raw.ttl(store.k_request("a")) <= 60
        assert 0 < await raw.ttl(store.k_tokens("a")) <= 60
        assert await raw.zcard(store.k_waiting) == 0
    finally:
        await raw.aclose()
    assert await store.active_requests() == []


async def test_prefix_isolates_two_deployments(store: Store, redis_url: str) -> None:
    other = Store(redis_url, prefix="t2")
    try:
        await store.create_request(record("a"), 1.0)
        assert await other.get_request("a") is None
        assert await other.create_request(record("a"), 1.0)  # same id, other namespace
        raw = aioredis.from_url(redis_url, decode_responses=True)
        keys = sorted(await raw.keys("*"))
        await raw.aclose()
        assert all(k.startswith(("t1:", "t2:")) for k in keys), keys
    finally:
        await other.close()


async def test_workers_and_policy(store: Store) -> None:
    assert await store.get_policy() is None
    await store.set_policy("least-loaded", {"skip_blocked": True})
    stored = await store.get_policy()
    assert stored is not None and (stored.name, stored.params) == ("least-loaded", {"skip_blocked": True})
    await store.put_worker(WorkerEntry("w1", "10.0.0.2:50061", registered=True))
    await store.put_worker(WorkerEntry("w0", "10.0.0.1:50061"))
    assert [w.worker_id for w in await store.workers()] == ["w0", "w1"]
    await store.remove_worker("10.0.0.1:50061")
    assert await store.workers() == [WorkerEntry("w1", "10.0.0.2:50061", registered=True)]


async def test_unreachable_redis_is_unavailable() -> None:
    from tests.conftest import free_port

    store = Store(f"redis://127.0.0.1:{free_port()}/0", retry=RetryPolicy(read_deadline_s=0.5))
    try:
        with pytest.raises(Unavailable, match="Redis"):
            await store.ping()
        with pytest.raises(Unavailable):
            await store.get_request("x")
    finally:
        await store.close()


async def test_a_commit_waits_out_a_redis_restart_and_reachability_follows(tmp_path: Path) -> None:
    """The mechanism's writes retry until Redis is back (nothing raised, nothing lost); the
    reachability listener sees it go and come back."""
    server = RedisServer(tmp_path, appendonly=True).start()
    store = Store(server.url, prefix="t3")
    seen: list[bool] = []
    store.on_reachability(seen.append)
    try:
        await store.create_request(record("a"), 1.0)
        server.kill()
        batch = StoreBatch()
        batch_tokens(batch, "a", [1, 2, 3], offset=0)
        commit = asyncio.create_task(store.commit(batch))
        await asyncio.sleep(1.0)
        assert not commit.done() and seen == [False]
        server.start()
        await asyncio.wait_for(commit, 15)
        assert seen == [False, True]
        assert await store.get_tokens("a") == [1, 2, 3]
    finally:
        await store.close()
        server.stop()


async def test_replaying_an_applied_append_adds_nothing(store: Store) -> None:
    """A retried pipeline that Redis had applied (the reply was lost) must not duplicate tokens."""
    await store.create_request(record("a"), 1.0)
    batch = StoreBatch()
    batch_tokens(batch, "a", [5, 6], offset=0)
    await store.commit(batch)
    await store.commit(batch)  # the replay
    later = StoreBatch()
    batch_tokens(later, "a", [7], offset=2)
    await store.commit(later)
    assert await store.get_tokens("a") == [5, 6, 7]


async def test_one_batch_appends_every_log_each_at_its_own_offset(store: Store) -> None:
    """A step's appends for many requests go in one script: each log is checked on its own, so a
    replayed part changes nothing while the new parts land (and long appends fit Lua's stack)."""
    for rid in ("a", "b", "c", "d"):
        await store.create_request(record(rid), 1.0)
    first = StoreBatch()
    batch_tokens(first, "a", [1, 2], offset=0)
    await store.commit(first)
    mixed = StoreBatch()
    batch_tokens(mixed, "a", [1, 2], offset=0)  # a replay: "a" already holds these
    batch_tokens(mixed, "b", [3], offset=0)
    batch_tokens(mixed, "c", list(range(20_000)), offset=0)  # more than one unpack() takes
    batch_tokens(mixed, "d", [4])  # no offset: unconditional
    batch_tokens(mixed, "d", [5])
    await store.commit(mixed)
    assert await store.get_tokens("a") == [1, 2]
    assert await store.get_tokens("b") == [3]
    assert await store.get_tokens("c") == list(range(20_000))
    assert await store.get_tokens("d") == [4, 5]


async def test_scripts_survive_a_flushed_script_cache(store: Store, redis_url: str) -> None:
    """Scripts run by SHA; a Redis that lost them (restarted, SCRIPT FLUSH) gets them again."""
    await store.create_request(record("a"), 1.0)
    batch = StoreBatch()
    batch_tokens(batch, "a", [1], offset=0)
    await store.commit(batch)
    raw = aioredis.from_url(redis_url)
    try:
        await raw.script_flush()
        assert await store.create_request(record("b"), 2.0)
        await raw.script_flush()
        later = StoreBatch()
        batch_tokens(later, "a", [2], offset=1)
        await store.commit(later)
    finally:
        await raw.aclose()
    assert await store.get_tokens("a") == [1, 2]
    assert await store.get_request("b") == record("b")


def test_record_fields_are_written_as_json_dumps_writes_them() -> None:
    from common.store import json_value

    values = ["a", 'é"\\\n', "", 0, -5, 2**70, 0.1, 1.0, 1e300, -0.0, float("inf"), float("nan"), True,
              False, None, [1, 2], {"max_tokens": 8, "stop_token_ids": []}]  # fmt: skip
    assert [json_value(v) for v in values] == [json.dumps(v) for v in values]
    r = record("a")
    assert r.to_hash() == {name: json.dumps(getattr(r, name)) for name in r.__dataclass_fields__}
