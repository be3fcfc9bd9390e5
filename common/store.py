"""The Redis store of the scheduler: request records, token logs, the waiting queue, the worker
registry and the active policy (key schema in docs/redis-schema.md).

All keys live under one namespace prefix. Writes that belong to one engine step or one round are
batched (``StoreBatch``) and several batches saved by one script call (``commit_many``); finished
requests' record and token log expire after the retention TTL. The scheduler's memory is
authoritative while it runs; Redis is what a restart reloads.
Every call retries with capped exponential backoff while Redis is unreachable (a restart, a stall):
reads give up after a bound with ``Unavailable``, a commit retries until it lands, and every write
is idempotent (token appends are conditional on the log length), so a retried commit that had in
fact been applied never duplicates a token.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from common.errors import Unavailable

log = logging.getLogger(__name__)

# ARGV: the key prefix, then a JSON list of creates, each [request id, queue score, [field, value,
# ...]]; returns one 1 (created) or 0 (the id exists: nothing written) per create, in order. A
# request is created whole or not at all (one script), so a scheduler killed mid-create never leaves
# a partial record behind. One script call carries every create that arrived while the previous one
# was out (``Store.create_request``): under load the client packs one command for many admissions.
_CREATE_SCRIPT = """
local prefix = ARGV[1]
local waiting = prefix .. ':waiting'
local out = {}
for i, c in ipairs(cjson.decode(ARGV[2])) do
  local key = prefix .. ':req:' .. c[1]
  if redis.call('EXISTS', key) == 1 then
    out[i] = 0
  else
    redis.call('HSET', key, unpack(c[3]))
    redis.call('ZADD', waiting, c[2], c[1])
    out[i] = 1
  end
end
return out
"""

# ARGV: the key prefix, the retention TTL of finished requests, then a JSON list of batches, each
# {"c": [[id, queue score, [field, value, ...]], ...], "u": [[id, [field, value, ...]], ...],
#  "t": [[id, log length before, [tokens]], ...], "e": [score, id, ...], "d": [id, ...],
#  "r": [id, ...], "f": [id, ...]}: creates (record and queue entry, skipped when the record
# exists: a replay never overwrites), hash updates, token appends, queue adds and removals,
# running adds, finishes. Applied in order, each batch's parts in that order. A log is appended
# only when it has exactly the length given (-1: unconditionally), so replaying an already applied
# commit changes nothing. One script per commit: the client packs one JSON string instead of a
# command per write (packing commands was most of the scheduler's Redis time), and Redis applies
# a commit whole.
_COMMIT_SCRIPT = """
local prefix, ttl = ARGV[1], tonumber(ARGV[2])
local waiting, running = prefix .. ':waiting', prefix .. ':running'
local function each_slice(values, call)  -- Lua's stack holds a few thousand values at a time
  for first = 1, #values, 1000 do call(unpack(values, first, math.min(first + 999, #values))) end
end
for _, b in ipairs(cjson.decode(ARGV[3])) do
  for _, c in ipairs(b.c) do
    local key = prefix .. ':req:' .. c[1]
    if redis.call('EXISTS', key) == 0 then
      redis.call('HSET', key, unpack(c[3]))
      redis.call('ZADD', waiting, c[2], c[1])
    end
  end
  for _, u in ipairs(b.u) do
    redis.call('HSET', prefix .. ':req:' .. u[1], unpack(u[2]))
  end
  for _, t in ipairs(b.t) do
    local key = prefix .. ':tokens:' .. t[1]
    if t[2] < 0 or redis.call('LLEN', key) == t[2] then
      each_slice(t[3], function(...) redis.call('RPUSH', key, ...) end)
    end
  end
  if #b.e > 0 then each_slice(b.e, function(...) redis.call('ZADD', waiting, ...) end) end
  if #b.d > 0 then each_slice(b.d, function(...) redis.call('ZREM', waiting, ...) end) end
  if #b.r > 0 then each_slice(b.r, function(...) redis.call('SADD', running, ...) end) end
  if #b.f > 0 then
    each_slice(b.f, function(...) redis.call('SREM', running, ...) end)
    each_slice(b.f, function(...) redis.call('ZREM', waiting, ...) end)
    for _, id in ipairs(b.f) do
      redis.call('EXPIRE', prefix .. ':req:' .. id, ttl)
      redis.call('EXPIRE', prefix .. ':tokens:' .. id, ttl)
    end
  end
end
return 1
"""


class _Script:
    """A Lua script run by its SHA1 (``EVALSHA``), loaded again whenever Redis has lost it (a
    restarted Redis starts with an empty script cache): the script's text is sent once, not with
    every call."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


@dataclass(frozen=True)
class RetryPolicy:
    """How the store waits out an unreachable Redis."""

    first_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    read_deadline_s: float = 10.0  # reads (and client-facing writes) give up after this long
    socket_timeout_s: float = 2.0  # a stalled (SIGSTOPped) Redis is noticed after this long


_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str (C)
_float_repr = float.__repr__


def json_value(value: Any) -> str:
    """``json.dumps(value)``, the same text, with the scalar kinds of a record's fields written
    directly (a request's hash has some twenty fields, and ``json.dumps`` costs a few calls for each)."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)  # type: ignore[no-any-return]
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return _float_repr(value)
    if kind is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    return json.dumps(value)


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
        return {name: json_value(getattr(self, name)) for name in self.__dataclass_fields__}

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
    """Writes of one step (or round), sent in one round trip by ``Store.commit``."""

    updates: dict[str, dict[str, str]] = field(default_factory=dict)  # request id -> hash fields
    tokens: dict[str, list[int]] = field(default_factory=dict)  # request id -> tokens to append
    token_offsets: dict[str, int] = field(default_factory=dict)  # request id -> log length before them
    finished: set[str] = field(default_factory=set)
    enqueued: dict[str, float] = field(default_factory=dict)  # request id -> queue score
    dequeued: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    # new waiting requests, saved first (record and queue entry; a record that exists is kept)
    created: list[tuple[str, float, list[str]]] = field(default_factory=list)

    def create(self, record: RequestRecord, score: float) -> None:
        """Save ``record`` as a new waiting request (what ``Store.create_request`` writes), in this
        batch: for a request whose id nobody else can know yet, so there is no "exists" to answer."""
        fields = [item for pair in record.to_hash().items() for item in pair]
        self.created.append((record.request_id, score, fields))

    def update(self, record: RequestRecord, *names: str) -> None:
        fields = self.updates.setdefault(record.request_id, {})
        for name in names or tuple(record.__dataclass_fields__):
            fields[name] = json_value(getattr(record, name))

    def __bool__(self) -> bool:
        return bool(
            self.updates or self.tokens or self.finished or self.enqueued or self.dequeued or self.running
            or self.created
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

        # The two flushers (commits, creates) each keep one call in flight, so each owns one
        # connection instead of taking one from the pool per call (the pool's get and release
        # cost about as much as the call itself). A broken one reconnects on the next call.
        def own_connection() -> aioredis.Redis:
            return aioredis.Redis.from_url(
                url,
                single_connection_client=True,
                decode_responses=True,
                socket_timeout=self.retry.socket_timeout_s,
                socket_connect_timeout=self.retry.socket_timeout_s,
            )

        self._committing = own_connection()
        self._creating = own_connection()
        self.reachable = True
        self._listeners: list[Callable[[bool], None]] = []
        self._closed = False
        self._down_since = 0.0
        # creates waiting for the next script call, and the task saving the current group
        self._creates: list[tuple[tuple[str, float, list[str]], asyncio.Future[bool]]] = []
        self._creator: asyncio.Task[None] | None = None

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
        await self._committing.aclose()
        await self._creating.aclose()
        await self._pool.aclose()

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is not reachable: {exc}") from exc

    # --- requests ---
    async def create_request(self, record: RequestRecord, score: float) -> bool:
        """Persist a new waiting request; False (nothing written) when the id already exists.

        Creates are grouped: one script call in flight, carrying every create that arrived while
        the previous one was out, each answered on its own (a retry of a create that was in fact
        applied answers False, and the caller attaches to it). Each gives up like a read
        (``Unavailable`` after ``retry.read_deadline_s``): a client is waiting on it."""
        fields = [item for pair in record.to_hash().items() for item in pair]
        created: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._creates.append(((record.request_id, score, fields), created))
        if self._creator is None:
            self._creator = asyncio.create_task(self._create_groups(), name="redis-creates")
        return await created

    async def _create_groups(self) -> None:
        try:
            while self._creates:
                group, self._creates = self._creates, []
                try:
                    payload = json.dumps([item for item, _ in group], separators=(",", ":"))
                    call = functools.partial(
                        self._evalsha, _CREATE, 0, self.prefix, payload, via=self._creating
                    )
                    results = await self._call(call)
                except BaseException as exc:
                    error = exc if isinstance(exc, Exception) else Unavailable("create cancelled")
                    for _, future in group:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(group, results, strict=True):
                    if not future.done():  # its caller may have gone away (a cancelled RPC)
                        future.set_result(bool(result))
        finally:
            self._creator = None
            if self._creates and not self._closed:  # cancelled with creates waiting: they still go
                self._creator = asyncio.create_task(self._create_groups(), name="redis-creates")

    async def _evalsha(
        self, script: _Script, numkeys: int, *args: Any, via: aioredis.Redis | None = None
    ) -> Any:
        """Run ``script`` (through ``via``, a flusher's own connection; else the pool)."""
        client = self._redis if via is None else via
        try:
            return await client.evalsha(script.sha, numkeys, *args)  # type: ignore[misc]
        except NoScriptError:
            await client.script_load(script.source)  # type: ignore[no-untyped-call]
            return await client.evalsha(script.sha, numkeys, *args)  # type: ignore[misc]

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
        """Apply one step's writes in a single round trip, retrying until it lands (or
        ``deadline_s`` passes: ``Unavailable``). Every write in it is idempotent, so a retry of a
        commit that did reach Redis changes nothing."""
        await self.commit_many([batch], deadline_s)

    async def commit_many(self, batches: Sequence[StoreBatch], deadline_s: float | None = None) -> None:
        """``commit`` of several batches in one script call, applied in their order (a later
        batch's writes win, a later append continues an earlier one)."""
        batches = [b for b in batches if b]
        if not batches:
            return
        await self._call(lambda: self._execute(batches), deadline_s=deadline_s, forever=deadline_s is None)

    async def _execute(self, batches: Sequence[StoreBatch]) -> None:
        payload = json.dumps([_to_json(batch) for batch in batches], separators=(",", ":"))
        await self._evalsha(_COMMIT, 0, self.prefix, self.retention_s, payload, via=self._committing)

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


_CREATE = _Script(_CREATE_SCRIPT)
_COMMIT = _Script(_COMMIT_SCRIPT)


def _to_json(batch: StoreBatch) -> dict[str, list[Any]]:
    """One batch as the commit script reads it."""
    return {
        "c": [[rid, score, fields] for rid, score, fields in batch.created],
        "u": [[rid, [x for pair in fields.items() for x in pair]] for rid, fields in batch.updates.items()
              if fields],
        "t": [
            [rid, batch.token_offsets.get(rid, -1), tokens] for rid, tokens in batch.tokens.items() if tokens
        ],
        "e": [x for rid, score in batch.enqueued.items() for x in (score, rid)],
        "d": sorted(batch.dequeued),
        "r": sorted(batch.running),
        "f": sorted(batch.finished),
    }


def batch_tokens(
    batch: StoreBatch, request_id: str, tokens: Sequence[int], offset: int | None = None
) -> None:
    """Append ``tokens`` to a request's pending token-log writes. ``offset`` is the log length
    before them (given on a request's first append in the batch): the append is then idempotent."""
    if offset is not None and request_id not in batch.tokens:
        batch.token_offsets[request_id] = offset
    batch.tokens.setdefault(request_id, []).extend(tokens)
