"""services.agent.work_queue.RedisWorkQueue against a real redis-server of the test's own: one delivery per item
among consumers, leases renewed by heartbeats, a dead consumer's items reclaimed with XAUTOCLAIM, acknowledgement
once the handler returned, and a Redis that came back empty."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import generate_latest

from altan import metrics
from altan.errors import Unavailable
from altan.store import MemoryBackend
from services.agent.work_queue import ImmediateQueue, LocalWorkQueue, RedisWorkQueue, WorkItem, report_depth
from tests.redis_server import RedisServer

KEY = "altan::agent:work"
LEASE = 1.0
WAIT = 15.0


class Consumer:
    """One replica's queue, serving until stopped; what its handler was given."""

    def __init__(
        self,
        url: str,
        name: str,
        handler: Callable[[WorkItem], Awaitable[None]] | None = None,
        *,
        concurrency: int = 10,
    ) -> None:
        self.queue = RedisWorkQueue(url, key=KEY, concurrency=concurrency, lease_seconds=LEASE, consumer=name)
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


async def until_empty(queue: RedisWorkQueue | LocalWorkQueue) -> None:
    """Until no item waits for a worker."""
    async with asyncio.timeout(WAIT):
        for _ in itertools.count():
            if not await queue.depth():
                return
            await asyncio.sleep(0.02)


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


async def test_a_heartbeat_renews_only_what_its_consumer_still_holds(
    redis_server: RedisServer, consumers: list[Consumer]
) -> None:
    """A replica that woke from a stall past its lease must not take back, with its heartbeat, an entry another
    replica reclaimed meanwhile (a plain XCLAIM did: the entry was then reclaimed and run once more)."""
    first = Consumer(redis_server.url, "a", hang)
    consumers.append(first)
    first.start()
    for task_id in ("tsk_3", "tsk_4"):
        await first.queue.put(WorkItem("acme", task_id))
    for _ in range(2):
        await asyncio.wait_for(first.got.get(), WAIT)
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        stolen, kept = [row["message_id"] for row in await client.xpending_range(KEY, "agents", "-", "+", 10)]
        # Another replica reclaims one, as its XAUTOCLAIM does once the lease lapsed.
        await client.xclaim(KEY, "agents", "b", 0, [stolen], justid=True)
        taken_at = asyncio.get_running_loop().time()
        async with asyncio.timeout(WAIT):
            while True:  # until a heartbeat of "a" ran since: the entry it holds was renewed after the reclaim
                rows = {row["message_id"]: row for row in await client.xpending_range(KEY, "agents", "-", "+", 10)}
                since_taken_ms = (asyncio.get_running_loop().time() - taken_at) * 1000
                if rows[kept]["time_since_delivered"] < since_taken_ms - 50:
                    break
                await asyncio.sleep(0.05)
        assert rows[kept]["consumer"] == "a"
        assert rows[stolen]["consumer"] == "b"
    finally:
        await client.aclose()


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


async def test_the_redis_queue_answers_how_many_items_wait_for_a_worker(
    redis_server: RedisServer, consumers: list[Consumer]
) -> None:
    release = asyncio.Event()

    async def held(item: WorkItem) -> None:
        await release.wait()

    producer = RedisWorkQueue(redis_server.url, key=KEY, concurrency=1, lease_seconds=LEASE, consumer="p")
    try:
        assert await producer.depth() == 0  # no stream yet
        for n in range(3):
            await producer.put(WorkItem("acme", f"tsk_d{n}"))
        assert await producer.depth() == 3  # no group yet: nothing delivered
        worker = Consumer(redis_server.url, "a", held, concurrency=1)
        consumers.append(worker)
        worker.start()
        await asyncio.wait_for(worker.got.get(), WAIT)
        assert await producer.depth() == 2  # the one it runs is not waiting
        release.set()
        await until_acknowledged(redis_server.url)
        await until_empty(producer)
        assert await worker.queue.depth() == 0
    finally:
        await producer.aclose()


async def test_the_redis_queue_depth_fails_while_redis_is_down(redis_server: RedisServer) -> None:
    queue = RedisWorkQueue(redis_server.url, key=KEY, concurrency=1, lease_seconds=LEASE)
    redis_server.stop()
    try:
        with pytest.raises(redis.exceptions.ConnectionError):  # report_depth keeps the last value then
            await queue.depth()
    finally:
        redis_server.start()
        await queue.aclose()


async def test_the_embedded_queue_answers_how_many_items_wait_for_a_worker() -> None:
    queue = LocalWorkQueue(MemoryBackend(), key=KEY, concurrency=1)
    release = asyncio.Event()
    started = asyncio.Event()

    async def held(item: WorkItem) -> None:
        started.set()
        await release.wait()

    for n in range(3):
        await queue.put(WorkItem("acme", f"tsk_l{n}"))
    assert await queue.depth() == 3  # not served yet
    serving = asyncio.create_task(queue.serve(held))
    try:
        await asyncio.wait_for(started.wait(), WAIT)
        assert await queue.depth() == 2  # one runs (concurrency 1), two wait for it
        release.set()
        await until_empty(queue)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_the_depth_is_sampled_until_cancelled_and_a_failed_sample_keeps_the_last_value() -> None:
    answers: list[int | Exception] = [4, RuntimeError("redis is restarting"), 2]
    reported: list[int] = []
    done = asyncio.Event()

    class Queue(ImmediateQueue):
        async def depth(self) -> int:
            answer = answers.pop(0) if answers else 0
            if not answers:
                done.set()
            if isinstance(answer, Exception):
                raise answer
            return answer

    sampling = asyncio.create_task(report_depth(Queue(), reported.append, every_seconds=0.01))
    await asyncio.wait_for(done.wait(), WAIT)
    sampling.cancel()
    await asyncio.gather(sampling, return_exceptions=True)
    assert sampling.cancelled()
    assert reported[:2] == [4, 2]


async def test_the_sampled_depth_is_what_the_metrics_endpoint_serves() -> None:
    queue = LocalWorkQueue(MemoryBackend(), key=KEY, concurrency=1)
    for n in range(2):
        await queue.put(WorkItem("acme", f"tsk_m{n}"))  # not served: both wait
    sampling = asyncio.create_task(report_depth(queue, metrics.set_task_queue_depth, every_seconds=0.01))
    try:
        async with asyncio.timeout(WAIT):
            while b"altan_task_queue_depth 2.0" not in generate_latest(metrics.REGISTRY):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        metrics.set_task_queue_depth(0)
