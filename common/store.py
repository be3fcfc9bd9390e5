"""The Redis store of the scheduler: request records, token logs, the waiting queue, the worker
registry and the active policy (key schema in docs/redis-schema.md).

All keys live under one namespace prefix. Writes that belong to one engine step are batched into
one pipeline (``StoreBatch``); finished requests' record and token log expire after the retention
TTL. The scheduler's memory is authoritative while it runs; Redis is what a restart reloads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.errors import Unavailable

# KEYS: request hash, waiting zset; ARGV: score, request id, then the hash's field/value pairs.
_CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


@dataclass
class RequestRecord:
    """Everything persisted about one request (one Redis hash)."""

    request_id: str
    status: str  # "waiting" | "running" | "finished"
    prompt_ids: list[int]
    sampling: dict[str, Any]  # common.types.SamplingParams as a dict
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
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
    """Async Redis access with a bounded, blocking connection pool."""

    def __init__(
        self, url: str, prefix: str = "layerkv", retention_s: int = 86400, max_connections: int = 32
    ):
        self.prefix = prefix
        self.retention_s = retention_s
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10, decode_responses=True
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)

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
        try:
            # One script, so a scheduler killed mid-create never leaves a partial record behind.
            created = await self._redis.eval(  # type: ignore[misc]
                _CREATE_SCRIPT, 2, key, self.k_waiting, score, record.request_id, *fields
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis write failed: {exc}") from exc
        return bool(created)

    async def get_request(self, request_id: str) -> RequestRecord | None:
        data = await self._call(self._redis.hgetall(self.k_request(request_id)))
        return RequestRecord.from_hash(data) if data else None

    async def get_tokens(self, request_id: str, offset: int = 0) -> list[int]:
        values = await self._call(self._redis.lrange(self.k_tokens(request_id), offset, -1))
        return [int(v) for v in values]

    async def active_requests(self) -> list[RequestRecord]:
        """Waiting (in queue order) then running requests, for restart recovery."""
        waiting = await self._call(self._redis.zrange(self.k_waiting, 0, -1))
        running = sorted(await self._call(self._redis.smembers(self.k_running)))
        records = []
        for request_id in [*waiting, *running]:
            record = await self.get_request(request_id)
            if record is not None and record.status != "finished":
                records.append(record)
        return records

    async def commit(self, batch: StoreBatch) -> None:
        """Apply one step's writes in a single pipeline round trip."""
        if not batch:
            return
        pipe = self._redis.pipeline(transaction=False)
        for request_id, fields in batch.updates.items():
            pipe.hset(self.k_request(request_id), mapping=fields)  # type: ignore[arg-type]
        for request_id, tokens in batch.tokens.items():
            if tokens:
                pipe.rpush(self.k_tokens(request_id), *tokens)
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
        await self._call(pipe.execute())

    # --- workers ---
    async def put_worker(self, entry: WorkerEntry) -> None:
        await self._call(self._redis.hset(self.k_workers, entry.address, json.dumps(asdict(entry))))

    async def remove_worker(self, address: str) -> None:
        await self._call(self._redis.hdel(self.k_workers, address))

    async def workers(self) -> list[WorkerEntry]:
        data = await self._call(self._redis.hgetall(self.k_workers))
        return [WorkerEntry(**json.loads(v)) for _, v in sorted(data.items())]

    # --- policy ---
    async def set_policy(self, name: str, params: dict[str, Any]) -> None:
        await self._call(self._redis.set(self.k_policy, json.dumps({"name": name, "params": params})))

    async def get_policy(self) -> StoredPolicy | None:
        raw = await self._call(self._redis.get(self.k_policy))
        if raw is None:
            return None
        data = json.loads(raw)
        return StoredPolicy(str(data["name"]), dict(data.get("params") or {}))

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis call failed: {exc}") from exc


def batch_tokens(batch: StoreBatch, request_id: str, tokens: Sequence[int]) -> None:
    """Append ``tokens`` to a request's pending token-log writes."""
    batch.tokens.setdefault(request_id, []).extend(tokens)
