"""altan.store: the same behaviour from the in-process MemoryBackend, the SqliteBackend (a file of the test's) and the
RedisBackend (a real Redis on 127.0.0.1:6379), seen through TenantStore, which takes the tenant from the request
context and nowhere else. What only the SQLite file does (processes sharing it) is in test_store_sqlite.py.

Every test works in tenants of its own (random names) and deletes their keys afterwards.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from altan import context
from altan.context import RequestContext
from altan.errors import Unauthenticated, Unavailable
from altan.store import (
    RETRY_AFTER_SECONDS,
    MemoryBackend,
    RedisBackend,
    SqliteBackend,
    StateBackend,
    TenantStore,
    open_backend,
)
from tests.redis_server import RedisServer

REDIS_URL = "redis://127.0.0.1:6379/0"


def as_tenant(tenant: str, role: str = "admin") -> None:
    """Bind a verified caller of ``tenant`` to the running task (as the server interceptor does)."""
    context.bind(RequestContext(tenant_id=tenant, user="u", role=role, token="t"))  # type: ignore[arg-type]


@dataclass
class Harness:
    kind: str
    backend: StateBackend
    tenants: list[str] = field(default_factory=list)

    def store(self, namespace: str = "svc") -> TenantStore:
        return TenantStore(self.backend, namespace)

    def new_tenant(self) -> str:
        tenant = f"unit-{uuid.uuid4().hex[:16]}"
        self.tenants.append(tenant)
        return tenant


@pytest.fixture
async def raw_redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL, decode_responses=True, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


def open_kind(kind: str, state_file: Path) -> StateBackend:
    if kind == "memory":
        return MemoryBackend()
    if kind == "sqlite":
        return SqliteBackend(state_file)
    return RedisBackend(REDIS_URL)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def harness(request: pytest.FixtureRequest, raw_redis: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Harness]:
    backend = open_kind(request.param, tmp_path / "state.db")
    h = Harness(request.param, backend)
    try:
        yield h
    finally:
        await backend.aclose()
        for tenant in h.tenants:
            keys = [key async for key in raw_redis.scan_iter(match=f"altan:{tenant}:*")]
            if keys:
                await raw_redis.delete(*keys)


@pytest.fixture
def tenant(harness: Harness) -> str:
    name = harness.new_tenant()
    as_tenant(name)
    return name


# --- collections -------------------------------------------------------------------------------------------------


async def test_get_put_delete_all(harness: Harness, tenant: str) -> None:
    store = harness.store()
    assert await store.get("agents", "a1") is None
    assert await store.all("agents") == {}

    doc: dict[str, Any] = {"name": "Ägent ✓", "nested": {"list": [1, 2.5, None, True]}, "empty": {}}
    await store.put("agents", "a1", doc)
    await store.put("agents", "a2", {"name": "second"})
    assert await store.get("agents", "a1") == doc
    assert await store.all("agents") == {"a1": doc, "a2": {"name": "second"}}

    await store.put("agents", "a1", {"name": "replaced"})
    assert await store.get("agents", "a1") == {"name": "replaced"}

    assert await store.delete("agents", "a1") is True
    assert await store.delete("agents", "a1") is False
    assert await store.get("agents", "a1") is None
    assert await store.all("agents") == {"a2": {"name": "second"}}


async def test_get_many_returns_only_what_exists(harness: Harness, tenant: str) -> None:
    store = harness.store()
    assert await store.get_many("tools", []) == {}
    await store.put("tools", "t1", {"n": 1})
    await store.put("tools", "t3", {"n": 3})
    assert await store.get_many("tools", ["t3", "t2", "t1"]) == {"t3": {"n": 3}, "t1": {"n": 1}}


async def test_put_new_refuses_a_taken_id_and_keeps_the_first(harness: Harness, tenant: str) -> None:
    store = harness.store()
    assert await store.put_new("keys", "k", {"v": 1}) is True
    assert await store.put_new("keys", "k", {"v": 2}) is False
    assert await store.get("keys", "k") == {"v": 1}


async def test_put_new_is_atomic_under_concurrency(harness: Harness, tenant: str) -> None:
    store = harness.store()
    won = await asyncio.gather(*(store.put_new("idem", "key", {"writer": i}) for i in range(20)))
    assert won.count(True) == 1
    assert await store.get("idem", "key") == {"writer": won.index(True)}


async def test_a_batch_of_writes_lands_together_and_wakes_readers(harness: Harness, tenant: str) -> None:
    store = harness.store()
    await store.append("events", {"n": 0})
    reader = asyncio.create_task(store.read("events", after=1, block_seconds=10))
    await asyncio.sleep(0)  # the reader waits (a blocked read; it is woken by the batch, not by a timeout)
    await store.write([("tasks", "t1", {"v": 1})], [("events", {"n": 1}, 100), ("events", {"n": 2}, 100)])
    assert await store.get("tasks", "t1") == {"v": 1}
    assert await asyncio.wait_for(reader, 5) in ([(2, {"n": 1}), (3, {"n": 2})], [(2, {"n": 1})])
    assert await store.read("events") == [(1, {"n": 0}), (2, {"n": 1}), (3, {"n": 2})]


async def test_collections_and_namespaces_are_separate(harness: Harness, tenant: str) -> None:
    agent, tool = harness.store("agent"), harness.store("tool")
    await agent.put("things", "x", {"from": "agent"})
    await tool.put("things", "x", {"from": "tool"})
    await agent.put("other", "x", {"from": "agent/other"})
    assert await agent.get("things", "x") == {"from": "agent"}
    assert await tool.get("things", "x") == {"from": "tool"}
    assert await agent.all("other") == {"x": {"from": "agent/other"}}


async def test_a_later_fence_holder_stops_the_writes_of_an_earlier_one(harness: Harness, tenant: str) -> None:
    # Two holders (two replicas, each with its own connection): the later one takes the fence over.
    store, other = harness.store(), harness.store()
    first = await store.take_fence("fences", "task-1")
    assert await store.put_fenced("tasks", "task-1", {"by": "first"}, first) is True
    assert await store.append_fenced("events", {"by": "first"}, first) == 1
    second = await other.take_fence("fences", "task-1")
    assert second.number == first.number + 1
    # The earlier holder writes nothing more, documents or events; the later one does.
    assert await store.put_fenced("tasks", "task-1", {"by": "first, late"}, first) is False
    assert await store.append_fenced("events", {"by": "first, late"}, first) == 0
    assert await other.put_fenced("tasks", "task-1", {"by": "second"}, second) is True
    assert await other.append_fenced("events", {"by": "second"}, second) == 2
    assert await store.get("tasks", "task-1") == {"by": "second"}
    assert [event for _, event in await store.read("events")] == [{"by": "first"}, {"by": "second"}]
    # Fences are per document: another task's is its own.
    assert (await store.take_fence("fences", "task-2")).number == 1


async def test_concurrent_fence_takers_get_distinct_numbers(harness: Harness, tenant: str) -> None:
    store = harness.store()
    taken = await asyncio.gather(*(store.take_fence("fences", "t") for _ in range(20)))
    assert sorted(f.number for f in taken) == list(range(1, 21))


# --- streams -----------------------------------------------------------------------------------------------------


async def test_append_numbers_events_from_one(harness: Harness, tenant: str) -> None:
    store = harness.store()
    assert [await store.append("events", {"n": i}) for i in range(1, 6)] == [1, 2, 3, 4, 5]
    assert await store.append("other-stream", {"n": 1}) == 1


async def test_concurrent_appends_get_distinct_consecutive_numbers(harness: Harness, tenant: str) -> None:
    store = harness.store()
    numbers = await asyncio.gather(*(store.append("events", {"writer": i}) for i in range(50)))
    assert sorted(numbers) == list(range(1, 51))
    events = await store.read("events")
    assert [seq for seq, _ in events] == list(range(1, 51))
    assert {event["writer"] for _, event in events} == set(range(50))


async def test_write_stores_documents_and_appends_events_at_once(harness: Harness, tenant: str) -> None:
    store = harness.store()
    await store.append("events:t1", {"n": 0})
    seqs = await store.write(
        [("tasks", "t1", {"status": "running"}), ("tasks", "t2", {"status": "queued"})],
        [("events:t1", {"n": 1}, 100), ("events:t1", {"n": 2}, 100), ("events:t2", {"n": 1}, 100)],
    )
    assert seqs == [2, 3, 1]
    assert await store.get_many("tasks", ["t1", "t2"]) == {"t1": {"status": "running"}, "t2": {"status": "queued"}}
    assert await store.read("events:t1") == [(1, {"n": 0}), (2, {"n": 1}), (3, {"n": 2})]
    assert await store.read("events:t2") == [(1, {"n": 1})]
    assert await store.write([("tasks", "t1", {"status": "succeeded"})]) == []
    assert await store.get("tasks", "t1") == {"status": "succeeded"}


async def test_a_write_wakes_a_blocked_reader(harness: Harness, tenant: str) -> None:
    store = harness.store()
    reader = asyncio.create_task(store.read("events:t1", 0, block_seconds=5))
    done, _ = await asyncio.wait({reader}, timeout=0.1)
    assert not done
    await store.write([("tasks", "t1", {"status": "running"})], [("events:t1", {"n": 1}, 100)])
    assert await asyncio.wait_for(reader, 3) == [(1, {"n": 1})]


async def test_read_after_and_count(harness: Harness, tenant: str) -> None:
    store = harness.store()
    assert await store.read("events") == []
    for i in range(1, 8):
        await store.append("events", {"n": i})
    assert await store.read("events") == [(i, {"n": i}) for i in range(1, 8)]
    assert await store.read("events", after=4) == [(5, {"n": 5}), (6, {"n": 6}), (7, {"n": 7})]
    assert await store.read("events", after=2, count=2) == [(3, {"n": 3}), (4, {"n": 4})]
    assert await store.read("events", after=7) == []
    assert await store.read("events", after=100) == []


async def test_tail_returns_the_newest_events_oldest_first(harness: Harness, tenant: str) -> None:
    store = harness.store()
    assert await store.tail("events", 3) == []
    for i in range(1, 8):
        await store.append("events", {"n": i})
    assert await store.tail("events", 3) == [{"n": 5}, {"n": 6}, {"n": 7}]
    assert await store.tail("events", 1) == [{"n": 7}]
    assert await store.tail("events", 100) == [{"n": i} for i in range(1, 8)]
    other = harness.new_tenant()
    as_tenant(other)
    assert await store.tail("events", 3) == []


async def test_blocking_read_returns_at_once_when_events_exist(harness: Harness, tenant: str) -> None:
    store = harness.store()
    await store.append("events", {"n": 1})
    started = time.monotonic()
    assert await store.read("events", block_seconds=5) == [(1, {"n": 1})]
    assert time.monotonic() - started < 1


async def test_blocking_read_wakes_when_another_task_appends(harness: Harness, tenant: str) -> None:
    store = harness.store()
    await store.append("events", {"n": 1})
    reader = asyncio.create_task(store.read("events", after=1, block_seconds=10))
    # A blocking read must not return early with nothing.
    done, _ = await asyncio.wait({reader}, timeout=0.1)
    assert not done
    started = time.monotonic()
    assert await store.append("events", {"n": 2}) == 2
    assert await asyncio.wait_for(reader, 5) == [(2, {"n": 2})]
    assert time.monotonic() - started < 5


async def test_blocking_read_times_out_with_nothing(harness: Harness, tenant: str) -> None:
    store = harness.store()
    started = time.monotonic()
    assert await store.read("events", block_seconds=0.2) == []
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 2


async def test_blocking_read_with_a_sub_millisecond_budget_returns(harness: Harness, tenant: str) -> None:
    # A tiny positive budget must not turn into "block forever" (Redis treats XREAD BLOCK 0 as no timeout).
    store = harness.store()
    assert await asyncio.wait_for(store.read("events", block_seconds=0.0004), 2) == []


async def test_another_tenants_append_does_not_wake_a_reader(harness: Harness, tenant: str) -> None:
    store = harness.store()
    other = harness.new_tenant()

    async def append_as_other() -> int:
        as_tenant(other)
        return await store.append("events", {"secret": "other tenant"})

    reader = asyncio.create_task(store.read("events", block_seconds=0.3))
    done, _ = await asyncio.wait({reader}, timeout=0.05)
    assert not done
    assert await asyncio.create_task(append_as_other()) == 1
    assert await reader == []


async def test_maxlen_keeps_the_newest_events(harness: Harness, tenant: str) -> None:
    store = harness.store()
    for i in range(1, 251):
        await store.append("events", {"n": i}, maxlen=5)
    events = await store.read("events", count=1000)
    seqs = [seq for seq, _ in events]
    # Redis trims approximately (MAXLEN ~), memory exactly: both keep at least the newest 5 and drop the oldest.
    assert seqs[-5:] == [246, 247, 248, 249, 250]
    assert seqs == list(range(seqs[0], 251))
    assert 1 not in seqs and len(seqs) < 250
    assert all(event == {"n": seq} for seq, event in events)
    # Numbering continues after trimming.
    assert await store.append("events", {"n": 251}, maxlen=5) == 251


async def test_memory_backend_trims_exactly() -> None:
    backend = MemoryBackend()
    for i in range(10):
        await backend.append("k", str(i), 3)
    assert await backend.read("k", 0, 100) == [(8, "7"), (9, "8"), (10, "9")]


# --- expiring values ----------------------------------------------------------------------------------------------


async def test_expiring_values_are_per_tenant_and_expire(
    harness: Harness, tenant: str, raw_redis: aioredis.Redis
) -> None:
    store = harness.store()
    assert await store.get_expiring("cache", "k") is None
    await store.set_expiring("cache", "k", "v1", 30)
    await store.set_expiring("cache", "k", "v2", 30)  # a rewrite replaces
    assert await store.get_expiring("cache", "k") == "v2"
    as_tenant(harness.new_tenant())
    assert await store.get_expiring("cache", "k") is None
    if harness.kind == "redis":
        ttl = await raw_redis.pttl(f"altan:{tenant}:svc:cache:k")
        assert 29_000 < ttl <= 30_000


async def test_memory_backend_expires_and_evicts_the_oldest_past_its_budget() -> None:
    now = [0.0]
    backend = MemoryBackend(max_expiring_bytes=10, clock=lambda: now[0])
    await backend.set_expiring("a", "12345", 5)
    await backend.set_expiring("b", "12345", 50)
    now[0] = 5.0
    assert (await backend.get_expiring("a"), await backend.get_expiring("b")) == (None, "12345")
    await backend.set_expiring("c", "123", 50)
    await backend.set_expiring("d", "1234567", 50)  # 15 bytes with b and c: b, the oldest, goes
    assert [await backend.get_expiring(k) for k in "bcd"] == [None, "123", "1234567"]


# --- token buckets ------------------------------------------------------------------------------------------------


async def test_a_bucket_shared_by_two_replicas_lets_exactly_its_capacity_through(harness: Harness, tenant: str) -> None:
    # Two backends on one Redis (or one SQLite file) are two replicas; memory has one process, so one backend.
    other = harness.backend
    if harness.kind == "redis":
        other = RedisBackend(REDIS_URL)
    elif isinstance(harness.backend, SqliteBackend):
        other = SqliteBackend(harness.backend.path)
    replicas = [harness.store(), TenantStore(other, "svc")]
    try:
        waits = await asyncio.gather(*(replicas[i % 2].take_token("tool:t", 10, 3600) for i in range(60)))
    finally:
        if other is not harness.backend:
            await other.aclose()
    assert sum(1 for w in waits if w == 0) == 10
    # The rest are told how long until the next token: 3600 s / 10 tokens, give or take the time the test took.
    assert all(355 < w <= 360 for w in waits if w)
    as_tenant(harness.new_tenant())
    assert await replicas[0].take_token("tool:t", 10, 3600) == 0  # another tenant's bucket is its own


async def test_a_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    store = TenantStore(MemoryBackend(clock=lambda: now[0]), "svc")
    as_tenant("acme")
    assert [await store.take_token("b", 2, 10) for _ in range(3)] == [0, 0, 5.0]
    now[0] = 5.0  # one token back
    assert [await store.take_token("b", 2, 10) for _ in range(2)] == [0, 5.0]
    now[0] = 100.0  # never more than the capacity
    assert [await store.take_token("b", 2, 10) for _ in range(3)] == [0, 0, 5.0]


# --- tenancy ------------------------------------------------------------------------------------------------------


async def test_two_tenants_never_see_each_others_data(harness: Harness) -> None:
    store = harness.store()
    first, second = harness.new_tenant(), harness.new_tenant()

    async def write_as(tenant: str) -> None:
        as_tenant(tenant)
        await store.put("agents", "same-id", {"owner": tenant})
        await store.put_new("keys", "same-key", {"owner": tenant})
        await store.append("events", {"owner": tenant})

    await asyncio.gather(write_as(first), write_as(second))

    async def view_as(tenant: str) -> tuple[Any, ...]:
        as_tenant(tenant)
        return (
            await store.get("agents", "same-id"),
            await store.all("agents"),
            await store.get("keys", "same-key"),
            await store.read("events"),
        )

    for tenant in (first, second):
        mine = {"owner": tenant}
        assert await view_as(tenant) == (mine, {"same-id": mine}, mine, [(1, mine)])

    as_tenant(first)
    assert await store.delete("agents", "same-id") is True
    as_tenant(second)
    assert await store.get("agents", "same-id") == {"owner": second}


async def test_tenant_comes_from_the_bound_context_only(harness: Harness) -> None:
    store = harness.store()
    first, second = harness.new_tenant(), harness.new_tenant()
    as_tenant(first)
    await store.put("agents", "a", {"v": 1})
    as_tenant(second)
    assert await store.get("agents", "a") is None
    assert await store.delete("agents", "a") is False
    as_tenant(first)
    assert await store.get("agents", "a") == {"v": 1}


async def test_no_bound_caller_is_unauthenticated(harness: Harness) -> None:
    store = harness.store()
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.get("c", "x"),
        lambda: store.put("c", "x", {}),
        lambda: store.put_new("c", "x", {}),
        lambda: store.delete("c", "x"),
        lambda: store.all("c"),
        lambda: store.append("s", {}),
        lambda: store.read("s", block_seconds=0.1),
    ]
    for call in calls:
        # A fresh context: nothing bound, whatever ran before in this task.
        with pytest.raises(Unauthenticated):
            await asyncio.create_task(call(), context=contextvars.Context())  # type: ignore[arg-type]


async def test_redis_keys_carry_the_tenant_prefix(raw_redis: aioredis.Redis) -> None:
    backend = RedisBackend(REDIS_URL)
    tenant = f"unit-{uuid.uuid4().hex[:16]}"
    try:
        as_tenant(tenant)
        store = TenantStore(backend, "svc")
        await store.put("agents", "a1", {"v": 1})
        await store.append("events", {"v": 1})
        keys = sorted([key async for key in raw_redis.scan_iter(match=f"*{tenant}*")])
        assert keys == [f"altan:{tenant}:svc:agents", f"altan:{tenant}:svc:events", f"altan:{tenant}:svc:events:seq"]
        assert all(key.startswith(f"altan:{tenant}:") for key in keys)
        assert await raw_redis.type(f"altan:{tenant}:svc:agents") == "hash"
        assert await raw_redis.type(f"altan:{tenant}:svc:events") == "stream"
    finally:
        await backend.aclose()
        keys = [key async for key in raw_redis.scan_iter(match=f"altan:{tenant}:*")]
        if keys:
            await raw_redis.delete(*keys)


async def test_a_redis_client_holds_many_commands_in_flight_and_refuses_past_its_bound() -> None:
    """redis-py's default pool refuses the 101st command in flight (MaxConnectionsError, a 503 for a burst of
    tasks); ours holds ``max_connections`` (1024 by default), and past them a command is UNAVAILABLE."""
    as_tenant(f"unit-{uuid.uuid4().hex[:16]}")
    wide = TenantStore(RedisBackend(REDIS_URL), "svc")
    small = TenantStore(RedisBackend(REDIS_URL, max_connections=4), "svc")
    try:
        # Blocking reads hold their connection for their whole wait.
        reads = [wide.read(f"nothing:{n}", block_seconds=0.5) for n in range(150)]
        assert await asyncio.gather(*reads) == [[]] * 150
        answers = await asyncio.gather(
            *(small.read(f"nothing:{n}", block_seconds=0.5) for n in range(6)), return_exceptions=True
        )
        assert sum(isinstance(a, Unavailable) for a in answers) == 2 and answers.count([]) == 4
    finally:
        await small._backend.aclose()  # type: ignore[attr-defined]
        await wide._backend.aclose()  # type: ignore[attr-defined]


async def test_open_backend_chooses_by_url_then_state_file(tmp_path: Path) -> None:
    memory = open_backend(None)
    assert isinstance(memory, MemoryBackend)
    assert await memory.ping() is True
    embedded = open_backend(None, tmp_path / "state.db")
    try:
        assert isinstance(embedded, SqliteBackend)
        assert await embedded.ping() is True
    finally:
        await embedded.aclose()
    redis_backend = open_backend(REDIS_URL)
    try:
        assert isinstance(redis_backend, RedisBackend)
        assert await redis_backend.ping() is True
    finally:
        await redis_backend.aclose()


# --- Redis unreachable ---------------------------------------------------------------------------------------------


async def test_an_unreachable_redis_is_unavailable_with_retry_after_and_comes_back(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url)
    as_tenant("outage")
    store = TenantStore(backend, "svc")
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.get("c", "x"),
        lambda: store.put("c", "x", {}),
        lambda: store.put_new("c", "y", {}),
        lambda: store.get_many("c", ["x"]),
        lambda: store.delete("c", "x"),
        lambda: store.all("c"),
        lambda: store.append("s", {}),
        lambda: store.read("s"),
        lambda: store.read("s", block_seconds=0.5),
        lambda: store.tail("s", 5),
        backend.ping,
    ]
    try:
        await store.put("c", "x", {"v": 1})
        redis_server.stop()
        for call in calls:
            with pytest.raises(Unavailable) as caught:
                await call()
            assert caught.value.retry_after == RETRY_AFTER_SECONDS
            assert "127.0.0.1" not in caught.value.message  # nothing about where the state lives
        redis_server.start()  # empty again (no persistence); the same client reconnects by itself
        assert await backend.ping() is True
        await store.put("c", "x", {"v": 2})
        assert await store.get("c", "x") == {"v": 2}
        assert await store.append("s", {"n": 1}) == 1  # the append script is loaded again into the new server
    finally:
        await backend.aclose()


async def test_a_redis_that_hangs_is_unavailable_within_the_command_timeout(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, command_timeout=0.5)
    as_tenant("hung")
    store = TenantStore(backend, "svc")
    try:
        await store.put("c", "x", {"v": 1})
        redis_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await store.get("c", "x")
            assert time.monotonic() - started < 3
            assert caught.value.retry_after == RETRY_AFTER_SECONDS
        finally:
            redis_server.resume()
        assert await store.get("c", "x") == {"v": 1}
    finally:
        await backend.aclose()
