"""The agent's work queue: an accepted task waits here until a replica runs it, and is delivered again (at least
once) when the replica that ran it died before it ended.

One interface, :class:`WorkQueue`, chosen by settings in :func:`open_work_queue`:

- :class:`RedisWorkQueue` (``REDIS_URL`` set): a Redis stream read by one consumer group, so any agent replica picks up
  any task. A replica holds a lease on what it runs: the entry stays pending under its consumer name, and a heartbeat
  (``XCLAIM ... JUSTID``, which resets the entry's idle time) renews it. Entries idle longer than the lease belong to
  a replica that died or hung: every replica reclaims them with ``XAUTOCLAIM`` and runs them again. An entry is
  acknowledged (and deleted) once its task ended.
- :class:`LocalWorkQueue` (embedded): the same contract on :class:`altan.store.StateBackend` primitives only (a hash
  of the pending items, a stream that wakes the consumer), so it lasts exactly as long as the backend's state does:
  in memory today, across restarts with a durable backend.
- :class:`ImmediateQueue`: runs every item at once in this process, remembering nothing (unit tests, and what a
  caller without a queue gets).

The handler decides what a delivery means: a task already ended is acknowledged at once, so a redelivery is cheap.

Each queue also answers its depth, the tasks accepted and waiting for a worker; :func:`report_depth` samples it into
the ``altan_task_queue_depth`` gauge every few seconds, off the path of any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import redis.exceptions

from altan.errors import Unavailable
from altan.store import REDIS_MAX_CONNECTIONS, Append, HashSet, StateBackend, redis_client

__all__ = [
    "Handler",
    "ImmediateQueue",
    "LocalWorkQueue",
    "ParkingQueue",
    "RedisWorkQueue",
    "Superseded",
    "WorkItem",
    "WorkQueue",
    "open_work_queue",
    "report_depth",
]

log = logging.getLogger(__name__)

_GROUP = "agents"
# A heartbeat: renew the leases of the entries this consumer still holds, and only those. A plain XCLAIM takes an
# entry from whoever holds it: a replica that woke from a stall past its lease took back what another replica had
# reclaimed and was running, which was then reclaimed and run a third time. ARGV: group, consumer, entry ids.
_RENEW = """
local renewed = {}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed[#renewed + 1] = ARGV[i]
  end
end
return renewed
"""
# A delivery that failed (a service it needed was down) is made again this long after, by the queues without leases.
_REDELIVER_SECONDS = 1.0
# How often the agent samples the queue's depth into the altan_task_queue_depth gauge.
DEPTH_SAMPLE_SECONDS = 5.0


@dataclass(frozen=True)
class WorkItem:
    """One accepted task to run: its tenant and its id (the task document holds the rest)."""

    tenant_id: str
    task_id: str

    def encode(self) -> str:
        return json.dumps({"t": self.tenant_id, "k": self.task_id})

    @classmethod
    def decode(cls, raw: str) -> WorkItem:
        doc = json.loads(raw)
        return cls(str(doc["t"]), str(doc["k"]))


class Superseded(Exception):
    """Raised by a handler whose run was taken over by a later delivery of its item (this replica stalled past its
    lease, and another one runs the task now): the item is neither acknowledged nor delivered again from here."""


# A queue's writes to the state backend (:meth:`WorkQueue.put_ops`): hash fields set, events appended.
QueueWrites = tuple[list[HashSet], list[Append]]

# Runs one item to its end (or until this process stops); raising leaves the item to be delivered again.
Handler = Callable[[WorkItem], Awaitable[None]]


class WorkQueue(Protocol):
    """Where accepted tasks wait for a replica."""

    # False: what this queue holds dies with the process (a shutdown must end its tasks itself).
    durable: bool

    async def put(self, item: WorkItem) -> None:
        """Accept an item: once this returns, some replica will run it (again after a crash)."""
        ...

    def put_ops(self, item: WorkItem) -> QueueWrites | None:
        """:meth:`put` as writes to the state backend, for the caller to commit with its own (one transaction), or
        None when this queue does not live in the state backend (the caller then calls :meth:`put`)."""
        ...

    async def depth(self) -> int:
        """Tasks accepted and waiting for a worker (not those running); cheap enough to sample every few seconds."""
        ...

    async def serve(self, handler: Handler) -> None:
        """Deliver items to ``handler`` until cancelled; several at once."""
        ...


@runtime_checkable
class ParkingQueue(Protocol):
    """A queue whose deliveries must not wait long (a push with a dispatch deadline): a run waiting for a person
    parks after ``park_after_seconds`` (its progress saved, the delivery ended) and is woken by an item of its own."""

    park_after_seconds: float

    async def wake(self, item: WorkItem, reason: str, *, at_ms: int | None = None) -> None:
        """Deliver ``item`` again, once per ``reason``, at ``at_ms`` (epoch milliseconds; None: now)."""
        ...


class _Runs:
    """The items this replica is running, each once, up to ``limit`` at a time."""

    def __init__(
        self,
        handler: Handler,
        limit: int,
        on_done: Callable[[str, WorkItem], Awaitable[None]],
        redeliver_after: float | None = None,
    ) -> None:
        self._handler = handler
        self._on_done = on_done
        # Queues without leases deliver a failed item again themselves, after this long; None: the lease does.
        self._redeliver_after = redeliver_after
        self.running: dict[str, asyncio.Task[None]] = {}
        self.capacity = asyncio.Semaphore(limit)
        self.active = 0  # of ``running``, those a worker runs now (the others wait for capacity)
        self._stopping = False

    def start(self, entry: str, item: WorkItem) -> None:
        if entry in self.running:
            return
        self.running[entry] = asyncio.create_task(self._run(entry, item), name=f"work-{item.task_id}")

    async def _run(self, entry: str, item: WorkItem) -> None:
        try:
            try:
                async with self.capacity:
                    self.active += 1
                    try:
                        await self._handler(item)
                    finally:
                        self.active -= 1
            except asyncio.CancelledError:
                if self._stopping:
                    raise  # this process stops: the item stays pending, and is delivered again
                # The task itself was cancelled (a caller asked), and its ending recorded: it is done.
            await self._on_done(entry, item)
        except asyncio.CancelledError:
            raise
        except Superseded:
            # Acknowledging would end the delivery the other replica runs (XACK does not ask whose it is).
            log.warning("a later delivery took this task over; this run stopped", extra={"task": item.task_id})
        except Exception:
            # Not acknowledged: delivered again (after the lease, or here after a pause).
            log.exception("running a queued task failed; it will be delivered again", extra={"task": item.task_id})
            if self._redeliver_after is not None and not self._stopping:
                asyncio.get_running_loop().call_later(self._redeliver_after, self._again, entry, item)
        finally:
            self.running.pop(entry, None)

    def _again(self, entry: str, item: WorkItem) -> None:
        if not self._stopping:
            self.start(entry, item)

    async def stop(self) -> None:
        self._stopping = True
        for run in self.running.values():
            run.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)


class ImmediateQueue:
    """Runs each item at once, in this process; nothing survives it."""

    durable = False

    def __init__(self) -> None:
        self._runs: _Runs | None = None
        self._early: list[WorkItem] = []  # put before the queue was served

    async def put(self, item: WorkItem) -> None:
        if self._runs is None:
            self._early.append(item)
        else:
            self._runs.start(item.task_id, item)

    def put_ops(self, item: WorkItem) -> None:
        return None

    async def depth(self) -> int:
        return len(self._early)  # a served queue runs each item as it comes

    async def serve(self, handler: Handler) -> None:
        self._runs = _Runs(handler, 1_000_000, _nothing, redeliver_after=_REDELIVER_SECONDS)
        for item in self._early:
            self._runs.start(item.task_id, item)
        self._early.clear()
        try:
            await asyncio.Event().wait()
        finally:
            await self._runs.stop()


async def _nothing(entry: str, item: WorkItem) -> None:
    return None


class LocalWorkQueue:
    """The embedded queue, on the state backend's primitives: a hash of the pending items, a stream to wake on.

    One agent process serves it (``altan up`` runs one), so there are no leases: what is pending when it starts
    belongs to a process that is gone, and runs again.
    """

    durable = True

    def __init__(self, backend: StateBackend, *, key: str, concurrency: int) -> None:
        self._backend = backend
        self._stream, self._pending = key, f"{key}-pending"
        self._concurrency = concurrency
        self._runs: _Runs | None = None

    async def put(self, item: WorkItem) -> None:
        await self._backend.write_many(*self.put_ops(item))

    def put_ops(self, item: WorkItem) -> QueueWrites:
        raw = item.encode()
        # The pending item (the truth: accepted once written) and its wake-up, in one write.
        return [(self._pending, item.task_id, raw)], [(self._stream, raw, 10_000)]

    async def depth(self) -> int:
        # The pending items are every task accepted and not ended; those a worker runs here are not waiting.
        pending = len(await self._backend.hgetall(self._pending))
        return max(0, pending - (self._runs.active if self._runs is not None else 0))

    async def serve(self, handler: Handler) -> None:
        runs = self._runs = _Runs(handler, self._concurrency, self._done, redeliver_after=_REDELIVER_SECONDS)
        try:
            last = await self._backend.tail(self._stream, 1)
            cursor = last[0][0] if last else 0
            for raw in (await self._backend.hgetall(self._pending)).values():
                item = WorkItem.decode(raw)
                runs.start(item.task_id, item)
            while True:
                batch = await self._backend.read(self._stream, cursor, 1000, block_seconds=10)
                if batch and batch[0][0] > cursor + 1:
                    # Wake-ups were trimmed away before they were read: the pending items are the truth.
                    for raw in (await self._backend.hgetall(self._pending)).values():
                        item = WorkItem.decode(raw)
                        runs.start(item.task_id, item)
                for seq, raw in batch:
                    cursor = seq
                    item = WorkItem.decode(raw)
                    runs.start(item.task_id, item)
        finally:
            await runs.stop()
            self._runs = None

    async def _done(self, entry: str, item: WorkItem) -> None:
        await self._backend.hdel(self._pending, item.task_id)


class RedisWorkQueue:
    """Redis Streams with one consumer group: at-least-once delivery, leases renewed by heartbeats, stalled entries
    reclaimed with XAUTOCLAIM."""

    durable = True

    def __init__(
        self,
        url: str,
        *,
        key: str,
        concurrency: int,
        lease_seconds: float,
        consumer: str = "",
        max_connections: int = REDIS_MAX_CONNECTIONS,
    ) -> None:
        # Blocking reads wait up to 2 s: the client's socket timeout is well above that.
        self._redis: Any = redis_client(url, socket_timeout=10, max_connections=max_connections)
        self._stream = key
        self._concurrency = concurrency
        self._lease_ms = int(lease_seconds * 1000)
        # Unique per process: a restarted replica is a new consumer, and its predecessor's entries are reclaimed.
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._renew = self._redis.register_script(_RENEW)

    def put_ops(self, item: WorkItem) -> None:
        return None  # a stream of its own client: XADD after the task's writes (put)

    async def put(self, item: WorkItem) -> None:
        try:
            await self._redis.xadd(self._stream, {"d": item.encode()})
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError):
            raise Unavailable("the work queue is unreachable; try again shortly", retry_after=1.0) from None

    async def depth(self) -> int:
        """The entries no consumer holds: an entry is deleted once its task ended, so the stream's length less the
        group's pending entries (delivered, running under a lease; a dead replica's wait for XAUTOCLAIM). Two O(1)
        commands in one round trip, the same answer from every replica; a Redis error is raised to the sampler."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self._stream)
            pipe.xinfo_groups(self._stream)
            length, groups = await pipe.execute(raise_on_error=False)
        if isinstance(length, Exception):
            raise length
        if isinstance(groups, redis.exceptions.ResponseError) and not length:
            return 0  # no stream yet (XINFO answers "no such key")
        if isinstance(groups, Exception):
            raise groups
        pending = sum(int(g["pending"]) for g in groups if g["name"] == _GROUP)
        return max(0, int(length) - pending)

    async def serve(self, handler: Handler) -> None:
        runs = _Runs(handler, self._concurrency, self._done)
        loops = [self._read(runs), self._heartbeat(runs), self._reclaim(runs)]
        tasks = [asyncio.create_task(loop) for loop in loops]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await runs.stop()

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _group(self) -> None:
        try:
            with contextlib.suppress(redis.exceptions.ResponseError):  # BUSYGROUP: it exists
                await self._redis.xgroup_create(self._stream, _GROUP, id="0", mkstream=True)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError):
            return  # the command that needs the group says so again, and comes back here

    async def _read(self, runs: _Runs) -> None:
        await self._group()
        while True:
            # Read only what there is room for: the rest stays in the stream for other replicas.
            room = self._concurrency - len(runs.running)
            if room <= 0:
                await asyncio.wait(list(runs.running.values()), return_when=asyncio.FIRST_COMPLETED)
                continue
            answer = await self._again(
                partial(self._redis.xreadgroup, _GROUP, self.consumer, {self._stream: ">"}, count=room, block=2000)
            )
            for _, entries in answer or ():
                for entry, fields in entries:
                    runs.start(entry, WorkItem.decode(fields["d"]))

    async def _heartbeat(self, runs: _Runs) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            if runs.running:
                renew = partial(self._renew, keys=[self._stream], args=[_GROUP, self.consumer, *runs.running])
                await self._again(renew, once=True)

    async def _reclaim(self, runs: _Runs) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 2000)
            start = "0-0"
            while True:
                claim = partial(
                    self._redis.xautoclaim,
                    self._stream,
                    _GROUP,
                    self.consumer,
                    self._lease_ms,
                    start_id=start,
                    count=100,
                )
                answer = await self._again(claim, once=True)
                if not answer:
                    break
                start, claimed = answer[0], answer[1]
                for entry, fields in claimed:
                    if fields:  # an entry deleted meanwhile comes back without its fields
                        log.info("reclaimed a stalled task", extra={"entry": entry})
                        runs.start(entry, WorkItem.decode(fields["d"]))
                if start == "0-0":
                    break

    async def _done(self, entry: str, item: WorkItem) -> None:
        await self._again(partial(self._ack, entry))

    async def _ack(self, entry: str) -> None:
        """Acknowledge and delete an entry in one round trip (a pipeline, not a transaction: each is idempotent)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(self._stream, _GROUP, entry)
            pipe.xdel(self._stream, entry)
            await pipe.execute()

    async def _again(self, command: Callable[[], Awaitable[Any]], *, once: bool = False) -> Any:
        """Run a Redis command, retrying while Redis is unreachable (a restart, a failover); ``once``: give up
        after one failure (the loop tries again on its next round). A Redis that came back empty has lost the
        group: it is made again (what the lost stream held is lost with it; so is every task's state)."""
        while True:
            try:
                return await command()
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("work queue: the consumer group is gone (Redis restarted empty?); making it again")
                await self._group()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError) as exc:
                log.warning("work queue: Redis unreachable, trying again", extra={"error": type(exc).__name__})
                await asyncio.sleep(1.0)
            if once:
                return None


async def report_depth(
    queue: WorkQueue, report: Callable[[int], None], *, every_seconds: float = DEPTH_SAMPLE_SECONDS
) -> None:
    """Sample the queue's depth into ``report`` (``altan.metrics.set_task_queue_depth``) every ``every_seconds``,
    until cancelled. A sample that fails (Redis restarting) leaves the last value; the next one tries again."""
    while True:
        try:
            report(await queue.depth())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("work queue: sampling its depth failed", extra={"error": type(exc).__name__})
        await asyncio.sleep(every_seconds)


def open_work_queue(
    backend: StateBackend,
    redis_url: str | None,
    *,
    key: str,
    concurrency: int,
    lease_seconds: float,
    redis_max_connections: int = REDIS_MAX_CONNECTIONS,
) -> WorkQueue:
    """Redis Streams with ``REDIS_URL``, else the local queue on the embedded state; ``key`` names it."""
    if redis_url:
        return RedisWorkQueue(
            redis_url,
            key=key,
            concurrency=concurrency,
            lease_seconds=lease_seconds,
            max_connections=redis_max_connections,
        )
    return LocalWorkQueue(backend, key=key, concurrency=concurrency)
