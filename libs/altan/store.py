"""State: one interface; a Redis implementation, an embedded SQLite one (``altan.store_sqlite``) and an
in-process one for tests.

Two shapes cover every service: *collections* (id → JSON document, e.g. agents, tools, tasks) and *streams*
(append-only JSON events numbered 1, 2, 3…, e.g. task events and the audit trail), with a blocking read so that
followers wake on new events instead of polling.

Tenancy is applied here and only here: :class:`TenantStore` takes the tenant from the verified request context
and builds every key from it, so no caller can read or write another tenant's keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from altan import _token_bucket as token_bucket
from altan import context
from altan.config import ConfigurationError, Settings
from altan.errors import Unavailable
from altan.store_sqlite import SqliteBackend, StateFileError

__all__ = [
    "REDIS_MAX_CONNECTIONS",
    "RETRY_AFTER_SECONDS",
    "Append",
    "Fence",
    "HashSet",
    "MemoryBackend",
    "RedisBackend",
    "SharedStore",
    "SqliteBackend",
    "StateBackend",
    "TenantStore",
    "open_backend",
    "open_state",
    "redis_client",
]

log = logging.getLogger(__name__)

Doc = dict[str, Any]

# Atomically number and append an event, so concurrent writers (several replicas) never reorder or collide.
_APPEND = """
local n = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '0-' .. n, 'd', ARGV[1])
return n
"""

# Hash fields set and events appended (numbered as _APPEND does) at once, in one command, atomically; fenced, only
# while a fence (a hash field holding a counter) still says the writer's number, else nothing and nil.
# KEYS[1] is the fence's hash (any key when unfenced), then each field's hash, then each event's stream and counter.
# ARGV: the fence's field ('' when unfenced) and the holder's number, the number of fields, the fields' names and
# values, then each event's value and maxlen. Answers the events' numbers.
_WRITE_MANY = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return false end
local fields = tonumber(ARGV[3])
local numbers = {}
for i = 1, fields do
  redis.call('HSET', KEYS[i + 1], ARGV[2 * i + 2], ARGV[2 * i + 3])
end
local k, a = fields + 2, 2 * fields + 4
while k <= #KEYS do
  local n = redis.call('INCR', KEYS[k + 1])
  redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[a + 1], '0-' .. n, 'd', ARGV[a])
  numbers[#numbers + 1] = n
  k, a = k + 2, a + 2
end
return numbers
"""

# The state of a fence, as the backends take it: (hash key, field, the holder's number as text).
Guard = tuple[str, str, str]

# A token bucket, atomically: ``capacity`` tokens that refill in ``per_seconds``; take one, or answer how long until one
# is there. Redis's own clock, so every replica sees one time. The answer is text: Lua numbers reach the client as
# integers.
_BUCKET = """
local capacity, per = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local rate = capacity / per
local elapsed = math.max(0, now - (tonumber(state[2]) or now))
local tokens = math.min(capacity, (tonumber(state[1]) or capacity) + elapsed * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(per * 1000) + 1000)
return tostring(wait)
"""


# One field of a hash to set: (key, field, value); one event to append to a stream: (key, value, maxlen).
HashSet = tuple[str, str, str]
Append = tuple[str, str, int]


class StateBackend(Protocol):
    """Raw key-addressed storage; only :class:`TenantStore` builds the keys.

    ``write_many`` sets hash fields and appends events all at once (one transaction: a reader sees all or none of
    them) in one round trip, and answers the appended events' sequence numbers: a task's document and the events of
    its change are one write.
    """

    async def hget(self, key: str, field: str) -> str | None: ...
    async def hset(self, key: str, field: str, value: str) -> None: ...
    async def hsetnx(self, key: str, field: str, value: str) -> bool: ...
    async def hdel(self, key: str, field: str) -> bool: ...
    async def hgetall(self, key: str) -> dict[str, str]: ...
    async def hmget(self, key: str, fields: list[str]) -> list[str | None]: ...
    async def append(self, key: str, value: str, maxlen: int) -> int: ...
    async def hincr(self, key: str, field: str) -> int: ...
    async def write_many(
        self, hsets: Sequence[HashSet], appends: Sequence[Append], guard: Guard | None = None
    ) -> list[int] | None: ...
    async def read(self, key: str, after: int, count: int, block_seconds: float = 0) -> list[tuple[int, str]]: ...
    async def tail(self, key: str, count: int) -> list[tuple[int, str]]: ...
    async def get_expiring(self, key: str) -> str | None: ...
    async def set_expiring(self, key: str, value: str, ttl_seconds: float) -> None: ...
    async def take_expiring(self, key: str) -> str | None: ...
    async def take_token(self, key: str, capacity: int, per_seconds: float) -> float: ...
    def lock(self, key: str, ttl_seconds: float, wait_seconds: float) -> AbstractAsyncContextManager[None]: ...
    async def ping(self) -> bool: ...
    async def aclose(self) -> None: ...


class MemoryBackend:
    """State in the memory of one process, gone with it: for tests, and ``ALTAN_STATE=memory``.

    Expiring values (a response cache) are bounded: past ``max_expiring_bytes`` of values the oldest writes go first,
    as Redis with an eviction policy would do. ``clock`` is for tests.
    """

    def __init__(
        self, *, max_expiring_bytes: int = 64 * 1024 * 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._expiring: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._expiring_bytes = 0
        self._max_expiring_bytes = max_expiring_bytes
        self._clock = clock
        self._hashes: dict[str, dict[str, str]] = defaultdict(dict)
        self._streams: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self._seq: dict[str, int] = defaultdict(int)
        self._changed: dict[str, asyncio.Condition] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, holders and waiters)

    async def hget(self, key: str, field: str) -> str | None:
        return self._hashes.get(key, {}).get(field)

    async def hset(self, key: str, field: str, value: str) -> None:
        self._hashes[key][field] = value

    async def hsetnx(self, key: str, field: str, value: str) -> bool:
        table = self._hashes[key]
        if field in table:
            return False
        table[field] = value
        return True

    async def hdel(self, key: str, field: str) -> bool:
        return self._hashes.get(key, {}).pop(field, None) is not None

    async def hgetall(self, key: str) -> dict[str, str]:
        return dict(self._hashes.get(key, {}))

    async def hmget(self, key: str, fields: list[str]) -> list[str | None]:
        table = self._hashes.get(key, {})
        return [table.get(f) for f in fields]

    async def append(self, key: str, value: str, maxlen: int) -> int:
        self._seq[key] += 1
        seq = self._seq[key]
        stream = self._streams[key]
        stream.append((seq, value))
        if len(stream) > maxlen:
            del stream[: len(stream) - maxlen]
        cond = self._changed.get(key)
        if cond is not None:
            async with cond:
                cond.notify_all()
        return seq

    async def hincr(self, key: str, field: str) -> int:
        value = int(self._hashes[key].get(field, "0")) + 1
        self._hashes[key][field] = str(value)
        return value

    async def write_many(
        self, hsets: Sequence[HashSet], appends: Sequence[Append], guard: Guard | None = None
    ) -> list[int] | None:
        if guard is not None and self._hashes.get(guard[0], {}).get(guard[1]) != guard[2]:
            return None
        for key, field, value in hsets:
            self._hashes[key][field] = value
        return [await self.append(key, value, maxlen) for key, value, maxlen in appends]

    async def read(self, key: str, after: int, count: int, block_seconds: float = 0) -> list[tuple[int, str]]:
        found = self._after(key, after, count)
        if found or block_seconds <= 0:
            return found
        cond = self._changed.setdefault(key, asyncio.Condition())
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: bool(self._after(key, after, 1))), block_seconds)
            except TimeoutError:
                return []
        return self._after(key, after, count)

    async def tail(self, key: str, count: int) -> list[tuple[int, str]]:
        return list(self._streams.get(key, ())[-count:]) if count > 0 else []

    def _after(self, key: str, after: int, count: int) -> list[tuple[int, str]]:
        return [item for item in self._streams.get(key, ()) if item[0] > after][:count]

    async def get_expiring(self, key: str) -> str | None:
        entry = self._expiring.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop_expiring(key)
            return None
        return entry[1]

    async def set_expiring(self, key: str, value: str, ttl_seconds: float) -> None:
        self._drop_expiring(key)
        self._expiring[key] = (self._clock() + ttl_seconds, value)
        self._expiring_bytes += len(value)
        while self._expiring_bytes > self._max_expiring_bytes and self._expiring:
            self._drop_expiring(next(iter(self._expiring)))

    async def take_expiring(self, key: str) -> str | None:
        value = await self.get_expiring(key)
        self._drop_expiring(key)
        return value

    @asynccontextmanager
    async def lock(self, key: str, ttl_seconds: float, wait_seconds: float) -> AsyncIterator[None]:
        # One process: an asyncio lock is the whole story (ttl_seconds matters only across processes).
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(wait_seconds):
                    await lock.acquire()
            except TimeoutError:
                busy = "a lock is held too long; try again shortly"
                raise Unavailable(busy, retry_after=RETRY_AFTER_SECONDS) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def take_token(self, key: str, capacity: int, per_seconds: float) -> float:
        now = self._clock()
        tokens, wait = token_bucket.take(self._buckets.get(key), now, capacity, per_seconds)
        self._buckets[key] = (tokens, now)
        return wait

    def _drop_expiring(self, key: str) -> None:
        entry = self._expiring.pop(key, None)
        if entry is not None:
            self._expiring_bytes -= len(entry[1])

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


# How long a caller should wait before trying again while Redis is unreachable (a restart or failover takes seconds).
RETRY_AFTER_SECONDS = 1.0


@contextmanager
def _unreachable_is_unavailable() -> Iterator[None]:
    """Redis down, restarting, loading or too slow: UNAVAILABLE with a retry-after (503 on REST), never a 500.

    redis-py drops the broken connection, and the next command reconnects: nothing else is needed to recover.
    """
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError) as exc:
        # The operator's detail (no secret in it: redis-py names the host and port, never the URL's password).
        log.warning("state store unreachable", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        raise Unavailable("state store unreachable; try again shortly", retry_after=RETRY_AFTER_SECONDS) from None


# Connections one Redis client of a process holds at most (ALTAN_REDIS_MAX_CONNECTIONS); past them a command is
# refused (UNAVAILABLE, 503 with Retry-After).
REDIS_MAX_CONNECTIONS = 1024


def redis_client(url: str, *, socket_timeout: float, max_connections: int = REDIS_MAX_CONNECTIONS) -> Any:
    """A Redis client as every part of the install opens one.

    ``from_url`` alone retries nothing, so a pooled connection left from before a Redis restart failed the first
    command that took it (a task submitted just after Redis came back was refused). Two quick retries on a
    connection error replace such a connection; a Redis that is really down still fails within a fraction of a
    second. The pool holds at most ``max_connections``: redis-py's default of 100 refused the 101st command in flight
    (``MaxConnectionsError``), which failed submissions and saves of a burst of 1,000 tasks with 503. (redis-py's
    ``BlockingConnectionPool``, which waits instead, cost a burst half as much CPU again: measured, docs/
    benchmarks.md.) Typed loosely: redis-py's sync/async union types do not narrow.
    """
    return aioredis.from_url(
        url,
        max_connections=max_connections,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    )


class RedisBackend:
    """Shared state in Redis or Memorystore (``REDIS_URL`` set), for several replicas of a service.

    Every command goes through :func:`_unreachable_is_unavailable`, the one place Redis failures are mapped.
    """

    def __init__(self, url: str, *, command_timeout: float = 5.0, max_connections: int = REDIS_MAX_CONNECTIONS) -> None:
        # A socket timeout bounds every command: a Redis that hangs (or fails over) is UNAVAILABLE well within a
        # call's deadline. Blocking reads wait up to 20 s, so they have a client (and pool) of their own.
        # Typed loosely: redis-py's sync/async union types do not narrow.
        self._redis: Any = redis_client(url, socket_timeout=command_timeout, max_connections=max_connections)
        self._blocking: Any = redis_client(url, socket_timeout=30, max_connections=max_connections)
        self._append = self._redis.register_script(_APPEND)
        self._write_many = self._redis.register_script(_WRITE_MANY)
        self._take_token = self._redis.register_script(_BUCKET)

    async def hget(self, key: str, field: str) -> str | None:
        with _unreachable_is_unavailable():
            return await self._redis.hget(key, field)

    async def hset(self, key: str, field: str, value: str) -> None:
        with _unreachable_is_unavailable():
            await self._redis.hset(key, field, value)

    async def hsetnx(self, key: str, field: str, value: str) -> bool:
        with _unreachable_is_unavailable():
            return bool(await self._redis.hsetnx(key, field, value))

    async def hdel(self, key: str, field: str) -> bool:
        with _unreachable_is_unavailable():
            return bool(await self._redis.hdel(key, field))

    async def hgetall(self, key: str) -> dict[str, str]:
        with _unreachable_is_unavailable():
            return await self._redis.hgetall(key)

    async def hmget(self, key: str, fields: list[str]) -> list[str | None]:
        if not fields:
            return []
        with _unreachable_is_unavailable():
            return await self._redis.hmget(key, fields)

    async def append(self, key: str, value: str, maxlen: int) -> int:
        with _unreachable_is_unavailable():
            return int(await self._append(keys=[key, key + ":seq"], args=[value, maxlen]))

    async def hincr(self, key: str, field: str) -> int:
        with _unreachable_is_unavailable():
            return int(await self._redis.hincrby(key, field, 1))

    async def write_many(
        self, hsets: Sequence[HashSet], appends: Sequence[Append], guard: Guard | None = None
    ) -> list[int] | None:
        # One script, so one command and one round trip, atomic as MULTI/EXEC would be (a pipeline with a script
        # in it costs redis-py a SCRIPT EXISTS round trip on every execute).
        first = guard[0] if guard is not None else (hsets[0][0] if hsets else appends[0][0])
        keys = [first] + [key for key, _, _ in hsets] + [k for key, _, _ in appends for k in (key, key + ":seq")]
        args: list[str | int] = [guard[1], guard[2]] if guard is not None else ["", ""]
        args.append(len(hsets))
        for _, field, value in hsets:
            args += [field, value]
        for _, value, maxlen in appends:
            args += [value, maxlen]
        with _unreachable_is_unavailable():
            numbers = await self._write_many(keys=keys, args=args)
        return None if numbers is None else [int(seq) for seq in numbers]

    async def read(self, key: str, after: int, count: int, block_seconds: float = 0) -> list[tuple[int, str]]:
        with _unreachable_is_unavailable():
            if block_seconds > 0:
                block_ms = max(1, int(min(block_seconds, 20) * 1000))  # BLOCK 0 would mean "forever"
                answer = await self._blocking.xread({key: f"0-{after}"}, count=count, block=block_ms)
                entries = answer[0][1] if answer else []
            else:
                entries = await self._redis.xrange(key, min=f"(0-{after}", count=count)
        return [(int(entry_id.split("-")[1]), fields["d"]) for entry_id, fields in entries]

    async def tail(self, key: str, count: int) -> list[tuple[int, str]]:
        if count <= 0:
            return []
        with _unreachable_is_unavailable():
            entries = await self._redis.xrevrange(key, count=count)
        return [(int(entry_id.split("-")[1]), fields["d"]) for entry_id, fields in reversed(entries)]

    async def get_expiring(self, key: str) -> str | None:
        with _unreachable_is_unavailable():
            return await self._redis.get(key)

    async def set_expiring(self, key: str, value: str, ttl_seconds: float) -> None:
        with _unreachable_is_unavailable():
            await self._redis.set(key, value, px=max(1, int(ttl_seconds * 1000)))

    async def take_expiring(self, key: str) -> str | None:
        with _unreachable_is_unavailable():
            return await self._redis.getdel(key)  # atomic: of two takers, one gets the value

    @asynccontextmanager
    async def lock(self, key: str, ttl_seconds: float, wait_seconds: float) -> AsyncIterator[None]:
        # redis-py's lock: SET NX PX with a random token, released by a script only by its owner; ttl_seconds frees
        # it if its holder dies.
        lock = self._redis.lock(key, timeout=ttl_seconds, blocking_timeout=wait_seconds)
        with _unreachable_is_unavailable():
            if not await lock.acquire():
                raise Unavailable("a lock is held too long; try again shortly", retry_after=RETRY_AFTER_SECONDS)
        try:
            yield
        finally:
            with _unreachable_is_unavailable():
                try:
                    await lock.release()
                except redis.exceptions.LockNotOwnedError:
                    log.warning("a lock expired before its holder released it", extra={"lock": key.rsplit(":", 1)[0]})

    async def take_token(self, key: str, capacity: int, per_seconds: float) -> float:
        with _unreachable_is_unavailable():
            return float(await self._take_token(keys=[key], args=[capacity, per_seconds]))

    async def ping(self) -> bool:
        with _unreachable_is_unavailable():
            return bool(await asyncio.wait_for(self._redis.ping(), 5))

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._blocking.aclose()


def open_backend(
    redis_url: str | None, state_file: Path | None = None, *, redis_max_connections: int = REDIS_MAX_CONNECTIONS
) -> StateBackend:
    """Redis when a URL is configured; else the embedded SQLite file ``state_file`` (shared by the processes of one
    machine, kept across restarts); else (tests, ``ALTAN_STATE=memory``) this process's memory.

    Raises :class:`altan.store_sqlite.StateFileError` when the file cannot be opened or written.
    """
    if redis_url:
        return RedisBackend(redis_url, max_connections=redis_max_connections)
    if state_file is not None:
        return SqliteBackend(state_file)
    return MemoryBackend()


def open_state(settings: Settings) -> StateBackend:
    """The state backend a service's settings choose (``REDIS_URL``, ``ALTAN_STATE``, ``ALTAN_DATA_DIR``); a state
    file that cannot be used stops the service at start with one line naming ``ALTAN_DATA_DIR``."""
    try:
        return open_backend(
            settings.redis_url, settings.state_file(), redis_max_connections=settings.redis_max_connections
        )
    except StateFileError as exc:
        raise ConfigurationError(f"ALTAN_DATA_DIR: {exc}") from None


@dataclass(frozen=True)
class Fence:
    """A holder's number on a fence (:meth:`TenantStore.take_fence`): its writes made with it happen only while no
    later holder took the fence."""

    collection: str
    doc_id: str
    number: int


class TenantStore:
    """A service's view of the state, always inside the current caller's tenant.

    ``namespace`` separates services and kinds of data (``agent``, ``tool``, ``integrator``...).
    """

    def __init__(self, backend: StateBackend, namespace: str) -> None:
        self._backend = backend
        self._namespace = namespace

    def _key(self, name: str) -> str:
        # The one place a tenant enters a key: from the verified token, never from a caller's argument.
        return f"altan:{context.current().tenant_id}:{self._namespace}:{name}"

    async def get(self, collection: str, doc_id: str) -> Doc | None:
        raw = await self._backend.hget(self._key(collection), doc_id)
        return None if raw is None else json.loads(raw)

    async def put(self, collection: str, doc_id: str, doc: Doc) -> None:
        await self._backend.hset(self._key(collection), doc_id, json.dumps(doc))

    async def take_fence(self, collection: str, doc_id: str) -> Fence:
        """Become the holder of fence ``doc_id`` (a counter in ``collection``), which stops the writes of every
        earlier holder made with :meth:`put_fenced` and :meth:`append_fenced` (one atomic increment)."""
        return Fence(collection, doc_id, await self._backend.hincr(self._key(collection), doc_id))

    def _guard(self, fence: Fence) -> Guard:
        return (self._key(fence.collection), fence.doc_id, str(fence.number))

    async def put_fenced(self, collection: str, doc_id: str, doc: Doc, fence: Fence) -> bool:
        """:meth:`put`, only while ``fence`` is the latest holder's (checked and written atomically); else False."""
        return await self.write(puts=[(collection, doc_id, doc)], fence=fence) is not None

    async def put_new(self, collection: str, doc_id: str, doc: Doc) -> bool:
        """Store only if absent; False when the id is taken (duplicates, idempotency keys)."""
        return await self._backend.hsetnx(self._key(collection), doc_id, json.dumps(doc))

    async def get_many(self, collection: str, doc_ids: list[str]) -> dict[str, Doc]:
        """The documents that exist among ``doc_ids``, in one round trip."""
        raw = await self._backend.hmget(self._key(collection), doc_ids)
        return {doc_id: json.loads(value) for doc_id, value in zip(doc_ids, raw, strict=True) if value is not None}

    async def delete(self, collection: str, doc_id: str) -> bool:
        return await self._backend.hdel(self._key(collection), doc_id)

    async def all(self, collection: str) -> dict[str, Doc]:
        raw = await self._backend.hgetall(self._key(collection))
        return {doc_id: json.loads(value) for doc_id, value in raw.items()}

    async def append(self, stream: str, event: Doc, maxlen: int = 10_000) -> int:
        """Append an event; returns its sequence number (1, 2, ...).

        Redis trims approximately (``MAXLEN ~``, cheap): it may keep somewhat more than ``maxlen`` events.
        """
        return await self._backend.append(self._key(stream), json.dumps(event), maxlen)

    async def append_fenced(self, stream: str, event: Doc, fence: Fence, maxlen: int = 10_000) -> int:
        """:meth:`append`, only while ``fence`` is the latest holder's; else 0 (nothing appended)."""
        numbers = await self.write(appends=[(stream, event, maxlen)], fence=fence)
        return numbers[0] if numbers else 0

    async def write(
        self,
        puts: Sequence[tuple[str, str, Doc]] = (),
        appends: Sequence[tuple[str, Doc, int]] = (),
        *,
        fence: Fence | None = None,
        raw: tuple[Sequence[HashSet], Sequence[Append]] = ((), ()),
    ) -> list[int] | None:
        """Store documents ``(collection, id, doc)`` and append events ``(stream, event, maxlen)`` at once: one
        transaction, one round trip. Returns the events' sequence numbers; with ``fence``, only while it is the
        latest holder's, else None and nothing written. ``raw``: a work queue's own writes (keys of its own, not a
        tenant's) in the same transaction."""
        return await self._backend.write_many(
            [(self._key(collection), doc_id, json.dumps(doc)) for collection, doc_id, doc in puts] + list(raw[0]),
            [(self._key(stream), json.dumps(event), maxlen) for stream, event, maxlen in appends] + list(raw[1]),
            self._guard(fence) if fence is not None else None,
        )

    async def read(
        self, stream: str, after: int = 0, count: int = 1000, block_seconds: float = 0
    ) -> list[tuple[int, Doc]]:
        """Events after ``after``; with ``block_seconds`` waits that long for the first new one."""
        items = await self._backend.read(self._key(stream), after, count, block_seconds)
        return [(seq, json.loads(value)) for seq, value in items]

    async def tail(self, stream: str, count: int) -> list[Doc]:
        """The newest ``count`` events, oldest first."""
        return [json.loads(value) for _, value in await self._backend.tail(self._key(stream), count)]

    async def get_expiring(self, kind: str, key: str) -> str | None:
        """A value stored with :meth:`set_expiring` that has not expired yet."""
        return await self._backend.get_expiring(self._key(f"{kind}:{key}"))

    async def set_expiring(self, kind: str, key: str, value: str, ttl_seconds: float) -> None:
        """Store a value that disappears after ``ttl_seconds`` (or earlier, past the embedded state's budget)."""
        await self._backend.set_expiring(self._key(f"{kind}:{key}"), value, ttl_seconds)

    async def take_expiring(self, kind: str, key: str) -> str | None:
        """Read and delete an expiring value at once: of concurrent takers (any replica), one gets it."""
        return await self._backend.take_expiring(self._key(f"{kind}:{key}"))

    def lock(self, name: str, ttl_seconds: float, wait_seconds: float) -> AbstractAsyncContextManager[None]:
        """A lock of the tenant's, across replicas with Redis; held at most ``ttl_seconds``, waited for at most
        ``wait_seconds`` (then UNAVAILABLE, try again)."""
        return self._backend.lock(self._key(f"lock:{name}"), ttl_seconds, wait_seconds)

    async def take_token(self, bucket: str, capacity: int, per_seconds: float) -> float:
        """Take one of ``capacity`` tokens that refill over ``per_seconds`` (atomic across replicas with Redis):
        0 when taken, else the seconds until one is there (nothing taken)."""
        return await self._backend.take_token(self._key(f"rate:{bucket}"), capacity, per_seconds)


class SharedStore:
    """Expiring values that belong to no tenant yet: what a request without a token must find by a secret it carries
    (an OAuth2 ``state`` coming back from a browser), which then says the tenant.

    Keys are ``altan::<namespace>:<kind>:<key>``: the empty tenant part is one no tenant can have.
    """

    def __init__(self, backend: StateBackend, namespace: str) -> None:
        self._backend = backend
        self._namespace = namespace

    def _key(self, kind: str, key: str) -> str:
        return f"altan::{self._namespace}:{kind}:{key}"

    async def set_expiring(self, kind: str, key: str, value: str, ttl_seconds: float) -> None:
        await self._backend.set_expiring(self._key(kind, key), value, ttl_seconds)

    async def take_expiring(self, kind: str, key: str) -> str | None:
        """Read and delete at once: of concurrent takers (any replica), one gets the value."""
        return await self._backend.take_expiring(self._key(kind, key))
