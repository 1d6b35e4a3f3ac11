"""services.agent.work_queue.RedisWorkQueue against a real redis-server of the test's own: one delivery per item
among consumers, leases renewed by heartbeats, a dead consumer's items reclaimed with XAUTOCLAIM, acknowledgement
once the handler returned, and a Redis that came back empty."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from altan.errors import Unavailable
from altan.store import MemoryBackend
from services.agent.work_queue import LocalWorkQueue, RedisWorkQueue, WorkItem
from tests.redis_server import RedisServer

KEY = "altan::agent:work"
LEASE = 1.0
WAIT = 15.0


class Consumer:
    """One replica's queue, serving until stopped; what its handler was given."""

    def __init__(self, url: str, name: str, handler: Callable[[WorkItem], Awaitable[None]] | None = None) -> None:
        self.queue = RedisWorkQueue(url, key=KEY, concurrency=10, lease_seconds=LEASE, consumer=name)
        self.got: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._handler = handler
        self._serving: asyncio.Task[None] | None = None

    async def _handle(self, item: WorkItem) -> None:
        await self.got.put(item)
        if self._handler is not None:
            await self._handler(item)

    def start(self) -> None:
        self._serving = asyncio.create_task(self.queue.serve(self._handle))

    async def stop(self) -> None:
        """As a process that dies: nothing it holds is acknowledged."""
        if self._serving is not None:
            self._serving.cancel()
            await asyncio.gather(self._serving, return_exceptions=True)
        await self.queue.aclose()


@pytest.fixture
async def consumers(redis_server: RedisServer) -> AsyncIterator[list[Consumer]]:
    made: list[Consumer] = []
    yield made
    for consumer in made:
        await consumer.stop()


async def pending(url: str) -> int:
    client = aioredis.from_url(url)
    try:
        return int((await client.xpending(KEY, "agents"))["pending"])
    finally:
        await client.aclose()


async def until_acknowledged(url: str) -> None:
    """Until nothing is pending in the group (the consumers acknowledge in their own tasks)."""
    async with asyncio.timeout(WAIT):
        for _ in itertools.count():
            if not await pending(url):
                return
            await asyncio.sleep(0.05)


async def hang(item: WorkItem) -> None:
    await asyncio.Event().wait()


async def test_a_dead_consumers_item_is_reclaimed_and_acknowledged_once_done(
    redis_server: RedisServer, consumers: list[Consumer]
) -> None:
    first = Consumer(redis_server.url, "a", hang)
    consumers.append(first)
    first.start()
    await first.queue.put(WorkItem("acme", "tsk_1"))
    assert await asyncio.wait_for(first.got.get(), WAIT) == WorkItem("acme", "tsk_1")
    await first.stop()  # dies while it runs the item: no heartbeat any more
    assert await pending(redis_server.url) == 1

    second = Consumer(redis_server.url, "b")
    consumers.append(second)
    second.start()
    assert await asyncio.wait_for(second.got.get(), WAIT) == WorkItem("acme", "tsk_1")
    await until_acknowledged(redis_server.url)  # right after the handler returned


async def test_a_heartbeat_keeps_a_long_run_from_being_taken_over(
    redis_server: RedisServer, consumers: list[Consumer]
) -> None:
    release = asyncio.Event()

    async def slow(item: WorkItem) -> None:
        await release.wait()

    first = Consumer(redis_server.url, "a", slow)
    consumers.append(first)
    first.start()
    await first.queue.put(WorkItem("acme", "tsk_2"))
    await asyncio.wait_for(first.got.get(), WAIT)
    second = Consumer(redis_server.url, "b")
    consumers.append(second)
    second.start()
    # Three leases long: without heartbeats the second consumer would reclaim it within one.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(second.got.get(), 3 * LEASE)
    release.set()
    await until_acknowledged(redis_server.url)
    assert second.got.empty()


async def test_each_item_goes_to_one_consumer(redis_server: RedisServer, consumers: list[Consumer]) -> None:
    replicas = [Consumer(redis_server.url, name) for name in ("a", "b", "c")]
    consumers.extend(replicas)
    for replica in replicas:
        replica.start()
    items = [WorkItem("acme", f"tsk_{n}") for n in range(30)]
    for item in items:
        await replicas[0].queue.put(item)
    received: list[WorkItem] = []
    async with asyncio.timeout(WAIT):
        while len(received) < len(items):
            for replica in replicas:
                while not replica.got.empty():
                    received.append(replica.got.get_nowait())
            await asyncio.sleep(0.05)
    assert sorted(received, key=lambda i: i.task_id) == sorted(items, key=lambda i: i.task_id)


async def test_a_redis_that_came_back_empty_gets_its_group_again(
    redis_server: RedisServer, consumers: list[Consumer]
) -> None:
    consumer = Consumer(redis_server.url, "a")
    consumers.append(consumer)
    consumer.start()
    await consumer.queue.put(WorkItem("acme", "before"))
    await asyncio.wait_for(consumer.got.get(), WAIT)
    redis_server.stop()
    redis_server.start()  # empty: no stream, no group
    async with asyncio.timeout(WAIT):
        while True:
            try:
                await consumer.queue.put(WorkItem("acme", "after"))
                break
            except Exception:
                await asyncio.sleep(0.1)
    assert await asyncio.wait_for(consumer.got.get(), WAIT) == WorkItem("acme", "after")


async def test_the_embedded_queue_delivers_a_failed_item_again() -> None:
    backend = MemoryBackend()
    queue = LocalWorkQueue(backend, key=KEY, concurrency=10)
    attempts: list[WorkItem] = []
    done = asyncio.Event()

    async def flaky(item: WorkItem) -> None:
        attempts.append(item)
        if len(attempts) == 1:
            raise Unavailable("the integrator is restarting")
        done.set()

    serving = asyncio.create_task(queue.serve(flaky))
    try:
        await queue.put(WorkItem("acme", "tsk_9"))
        await asyncio.wait_for(done.wait(), WAIT)
        assert attempts == [WorkItem("acme", "tsk_9")] * 2
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
