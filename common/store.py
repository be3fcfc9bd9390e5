"""The Redis store of the scheduler: request records, token logs, the waiting queue, the worker
registry and the active policy (key schema in docs/redis-schema.md).

All keys live under one namespace prefix. Writes that belong to one engine step are batched into
one pipeline (``StoreBatch``); finished requests' record and token log expire after the retention
TTL. The scheduler's memory is authoritative while it runs; Redis is what a restart reloads.
Every call retries with capped exponential backoff while Redis is unreachable (a restart, a stall):
reads give up after a bound with ``Unavailable``, a commit retries until it lands, and every write
is idempotent (token appends are conditional on the log length), so a retried pipeline that had in
fact been applied never duplicates a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.errors import Unavailable

log = logging.getLogger(__name__)

# KEYS: request hash, waiting zset; ARGV: score, request id, then the hash's field/value pairs.
_CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: token log; ARGV: the log length these tokens start at, then the tokens. Appends only when
# the log has exactly that length, so replaying an already applied append changes nothing.
_APPEND_SCRIPT = """
local n = redis.call('LLEN', KEYS[1])
if n == tonumber(ARGV[1]) then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
  return 1
end
return 0
"""


@dataclass(frozen=True)
class RetryPolicy:
    """How the store waits out an unreachable Redis."""

    first_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    read_deadline_s: float = 10.0  # reads (and client-facing writes) give up after this long
    socket_timeout_s: float = 2.0  # a stalled (SIGSTOPped) Redis is noticed after this long


@dataclass
class RequestRecord:
    """Everything persisted about one request (one Redis hash)."""

    request_id: str
    status: str  # "waiting" | "running" | "finished"
    prompt_ids: list[int]
    sampling: dict[str, Any]  # common.types.SamplingParams as a dict
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    expected_output_tokens: int = 0  # the client's estimate of its output length (0: not given)
    text_prompt: bool = False  # the client sent text (the scheduler tokenized it)
    worker_id: str = ""
    placement: str = ""
    arrival_time: float = 0.0
    dispatch_time: float = 0.0
    first_token_time: float = 0.0
    finish_time: float = 0.0
    requeues: int = 0  # also the attempt number: the worker-side id is ``<id>@<requeues>``
    finish_reason: str = ""  # common.types.FinishReason value, "" while unfinished
    error: str = ""
    output_tokens: int = 0  # length of the token log

    def to_hash(self) -> dict[str, str]:
        # getattr, not dataclasses.asdict: asdict deep-copies the prompt on every call
        return {name: json.dumps(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> RequestRecord:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: json.loads(v) for k, v in data.items() if k in known}
        return cls(**values)


@dataclass(frozen=True)
class WorkerEntry:
    """A worker the scheduler knows: where to dial it."""

    worker_id: str
    address: str
    registered: bool = False  # self-registered (kept across restarts) vs configured


@dataclass(frozen=True)
class StoredPolicy:
    """The active policy as persisted (wins over the command line on restart)."""

    name: str
    params: dict[str, Any]


@dataclass
class StoreBatch:
    """Writes of one step, sent in one pipeline round trip by ``Store.commit``."""

    updates: dict[str, dict[str, str]] = field(default_factory=dict)  # request id -> hash fields
    tokens: dict[str, list[int]] = field(default_factory=dict)  # request id -> tokens to append
    token_offsets: dict[str, int] = field(default_factory=dict)  # request id -> log length before them
    finished: set[str] = field(default_factory=set)
    enqueued: dict[str, float] = field(default_factory=dict)  # request id -> queue score
    dequeued: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)

    def update(self, record: RequestRecord, *names: str) -> None:
        fields = self.updates.setdefault(record.request_id, {})
        for name in names or tuple(record.__dataclass_fields__):
            fields[name] = json.dumps(getattr(record, name))

    def __bool__(self) -> bool:
        return bool(
            self.updates or self.tokens or self.finished or self.enqueued or self.dequeued or self.running
        )


class Store:
    """Async Redis access with a bounded, blocking connection pool, retries and a reachability flag."""

    def __init__(
        self,
        url: str,
        prefix: str = "layerkv",
        retention_s: int = 86400,
        max_connections: int = 32,
        retry: RetryPolicy | None = None,
    ):
        self.prefix = prefix
        self.retention_s = retention_s
        self.retry = retry or RetryPolicy()
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=10,
            decode_responses=True,
            socket_timeout=self.retry.socket_timeout_s,
            socket_connect_timeout=self.retry.socket_timeout_s,
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self.reachable = True
        self._listeners: list[Callable[[bool], None]] = []
        self._closed = False
        self._down_since = 0.0

    def on_reachability(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(reachable)`` whenever Redis becomes unreachable or reachable again."""
        self._listeners.append(listener)

    def _set_reachable(self, reachable: bool, error: BaseException | None = None) -> None:
        if reachable == self.reachable:
            return
        self.reachable = reachable
        if reachable:
            log.warning("Redis is reachable again after %.1f s", time.monotonic() - self._down_since)
        else:
            self._down_since = time.monotonic()
            log.warning("Redis is unreachable (%s); retrying with backoff", error)
        for listener in self._listeners:
            try:
                listener(reachable)
            except Exception:  # a listener's bug must not break the store
                log.exception("Redis reachability listener failed")

    async def monitor(self, interval_s: float = 0.5) -> None:
        """Ping forever so reachability is known without traffic (run as a background task)."""
        while not self._closed:
            try:
                await self._redis.ping()
                self._set_reachable(True)
            except (RedisError, OSError) as exc:
                self._set_reachable(False, exc)
            except Exception:  # never end the monitor: log and go on
                log.exception("Redis monitor failed")
            await asyncio.sleep(interval_s)

    # --- key schema (docs/redis-schema.md) ---
    def k_request(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def k_tokens(self, request_id: str) -> str:
        return f"{self.prefix}:tokens:{request_id}"

    @property
    def k_waiting(self) -> str:
        return f"{self.prefix}:waiting"

    @property
    def k_running(self) -> str:
        return f"{self.prefix}:running"

    @property
    def k_workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def k_policy(self) -> str:
        return f"{self.prefix}:policy"

    async def close(self) -> None:
        self._closed = True
        await self._redis.aclose()
        await self._pool.aclose()

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is not reachable: {exc}") from exc

    # --- requests ---
    async def create_request(self, record: RequestRecord, score: float) -> bool:
        """Persist a new waiting request; False (nothing written) when the id already exists."""
        key = self.k_request(record.request_id)
        fields = [item for pair in record.to_hash().items() for item in pair]
        # One script, so a scheduler killed mid-create never leaves a partial record behind; a retry
        # of a create that was in fact applied answers False, and the caller attaches to it.
        created = await self._call(
            lambda: self._redis.eval(  # type: ignore[misc]
                _CREATE_SCRIPT, 2, key, self.k_waiting, score, record.request_id, *fields
            )
        )
        return bool(created)

    async def get_request(self, request_id: str) -> RequestRecord | None:
        data = await self._call(lambda: self._redis.hgetall(self.k_request(request_id)))
        return RequestRecord.from_hash(data) if data else None

    async def get_tokens(self, request_id: str, offset: int = 0) -> list[int]:
        values = await self._call(lambda: self._redis.lrange(self.k_tokens(request_id), offset, -1))
        return [int(v) for v in values]

    async def active_requests(self) -> list[RequestRecord]:
        """Waiting (in queue order) then running requests, for restart recovery."""
        waiting = await self._call(lambda: self._redis.zrange(self.k_waiting, 0, -1))
        running = sorted(await self._call(lambda: self._redis.smembers(self.k_running)))
        records = []
        for request_id in [*waiting, *running]:
            record = await self.get_request(request_id)
            if record is not None and record.status != "finished":
                records.append(record)
        return records

    async def commit(self, batch: StoreBatch, deadline_s: float | None = None) -> None:
        """Apply one step's writes in a single pipeline round trip, retrying until it lands (or
        ``deadline_s`` passes: ``Unavailable``). Every write in it is idempotent, so a retry of a
        pipeline that did reach Redis changes nothing."""
        if not batch:
            return
        await self._call(
            lambda: self._pipeline(batch).execute(), deadline_s=deadline_s, forever=deadline_s is None
        )

    def _pipeline(self, batch: StoreBatch) -> Any:
        pipe = self._redis.pipeline(transaction=False)
        for request_id, fields in batch.updates.items():
            pipe.hset(self.k_request(request_id), mapping=fields)  # type: ignore[arg-type]
        for request_id, tokens in batch.tokens.items():
            if not tokens:
                continue
            offset = batch.token_offsets.get(request_id)
            if offset is None:
                pipe.rpush(self.k_tokens(request_id), *tokens)
            else:
                pipe.eval(_APPEND_SCRIPT, 1, self.k_tokens(request_id), offset, *tokens)
        if batch.enqueued:
            pipe.zadd(self.k_waiting, batch.enqueued)
        if batch.dequeued:
            pipe.zrem(self.k_waiting, *batch.dequeued)
        if batch.running:
            pipe.sadd(self.k_running, *batch.running)
        if batch.finished:
            pipe.srem(self.k_running, *batch.finished)
            pipe.zrem(self.k_waiting, *batch.finished)
            for request_id in batch.finished:
                pipe.expire(self.k_request(request_id), self.retention_s)
                pipe.expire(self.k_tokens(request_id), self.retention_s)
        return pipe

    # --- workers ---
    async def put_worker(self, entry: WorkerEntry) -> None:
        await self._call(lambda: self._redis.hset(self.k_workers, entry.address, json.dumps(asdict(entry))))

    async def remove_worker(self, address: str) -> None:
        await self._call(lambda: self._redis.hdel(self.k_workers, address))

    async def workers(self) -> list[WorkerEntry]:
        data = await self._call(lambda: self._redis.hgetall(self.k_workers))
        return [WorkerEntry(**json.loads(v)) for _, v in sorted(data.items())]

    # --- policy ---
    async def set_policy(self, name: str, params: dict[str, Any]) -> None:
        await self._call(lambda: self._redis.set(self.k_policy, json.dumps({"name": name, "params": params})))

    async def get_policy(self) -> StoredPolicy | None:
        raw = await self._call(lambda: self._redis.get(self.k_policy))
        if raw is None:
            return None
        data = json.loads(raw)
        return StoredPolicy(str(data["name"]), dict(data.get("params") or {}))

    async def _call(
        self, make: Callable[[], Awaitable[Any]], deadline_s: float | None = None, forever: bool = False
    ) -> Any:
        """``await make()``, retried with capped exponential backoff while Redis is unreachable:
        until it succeeds when ``forever`` (writes the mechanism cannot drop), else for at most
        ``deadline_s`` (default ``retry.read_deadline_s``), then ``Unavailable``."""
        limit = self.retry.read_deadline_s if deadline_s is None else deadline_s
        give_up = time.monotonic() + limit
        backoff = self.retry.first_backoff_s
        while True:
            try:
                result = await make()
            except (RedisError, OSError) as exc:
                self._set_reachable(False, exc)
                if self._closed or (not forever and time.monotonic() + backoff > give_up):
                    raise Unavailable(f"Redis is unreachable: {exc}") from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry.max_backoff_s)
                continue
            self._set_reachable(True)
            return result


def batch_tokens(
    batch: StoreBatch, request_id: str, tokens: Sequence[int], offset: int | None = None
) -> None:
    """Append ``tokens`` to a request's pending token-log writes. ``offset`` is the log length
    before them (given on a request's first append in the batch): the append is then idempotent."""
    if offset is not None and request_id not in batch.tokens:
        batch.token_offsets[request_id] = offset
    batch.tokens.setdefault(request_id, []).extend(tokens)
