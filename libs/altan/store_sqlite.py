"""Embedded state that lasts: the :class:`~altan.store.StateBackend` on one SQLite file under ``ALTAN_DATA_DIR``.

The local services of ``altan up`` are separate processes; each opens the same file (``state.db``), so they share
one state as replicas share Redis, and stopping and starting the stack forgets nothing. How (docs/decisions.md,
"Embedded state: SQLite"):

- WAL, so readers never wait for the writer; ``synchronous=NORMAL``: a commit survives a crash of any process, and
  only an OS crash or power cut may lose the last commits (never corrupt the file). Writers of several processes
  queue: a call that finds the file locked is tried again after 0.1 ms, doubling to 2 ms, for up to
  ``busy_timeout_seconds`` (SQLite's own busy handler sleeps 1 to 100 ms at a time: measured, it made the 99th
  percentile of a write under contention twice as long, and its worst case ten times).
- Every operation is one statement or one short ``BEGIN IMMEDIATE`` transaction, so what callers rely on is atomic
  across processes as it is on Redis: ``hsetnx``, stream numbering, ``take_expiring`` (GETDEL), token buckets, locks,
  ``write_many`` (a task document with the events of its change).
- SQLite calls never run on the event loop: each backend has one thread of its own holding its one connection
  (statements stay prepared in the connection's cache); coroutines queue calls to it, and it hands back every
  result it has ready in one wake-up of the loop.
- A blocking ``read`` wakes at once on an append of the same process. Appends of other processes are seen by one
  poll per process, of ``PRAGMA data_version`` (it changes when another connection commits), every
  ``poll_seconds`` (50 ms) while someone waits: that is the latency it adds. When it changed, one query finds the
  streams that grew, so the cost is one cheap query per interval whatever the number of waiters.
- Expiring values expire lazily on read, and in bounded sweeps as values are written; their total size is bounded
  like :class:`~altan.store.MemoryBackend`'s: past ``max_expiring_bytes`` the oldest writes go first.

Times are wall-clock seconds (``time.time``): a value or a lock written by one process expires for all of them, and
after a restart of the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from altan import _token_bucket as token_bucket
from altan.errors import Unavailable

__all__ = ["SqliteBackend", "StateFileError", "prepare_state_file"]

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_AFTER_SECONDS = 1.0  # as altan.store's: a write that waited out busy_timeout, a lock held too long

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hashes (key TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (key, field)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (key TEXT NOT NULL, seq INTEGER NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (key, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS expiring (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, value TEXT NOT NULL,
    expires_at REAL NOT NULL, size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS expiring_by_expiry ON expiring (expires_at);
CREATE TABLE IF NOT EXISTS expiring_total (one INTEGER PRIMARY KEY CHECK (one = 1), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO expiring_total VALUES (1, 0);
CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, at REAL NOT NULL,
    expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
"""
# Rows removed by one sweep of expired values and buckets: bounded, so no write waits for a long delete.
_SWEEP_ROWS = 500
# Streams are trimmed to their maxlen every this many appends.
_TRIM_EVERY = 32
# A sweep every this many writes of expiring values or buckets (and the lazy removal on read in between).
_SWEEP_EVERY = 200
# SQLITE_BUSY and SQLITE_LOCKED (primary result codes): another connection holds the lock.
_BUSY = frozenset({5, 6})


class StateFileError(Exception):
    """The state file cannot be opened or written (a read-only directory, a full disk, not a database)."""


class SqliteBackend:
    """Shared embedded state in one SQLite file, for the processes of one machine (``REDIS_URL`` unset)."""

    def __init__(
        self,
        path: Path,
        *,
        max_expiring_bytes: int = 64 * 1024 * 1024,
        poll_seconds: float = 0.05,
        busy_timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._max_expiring_bytes = max_expiring_bytes
        self._poll_seconds = poll_seconds
        self._clock = clock
        self._writes = itertools.count(1)
        # Waiters of this process: a blocked read per stream key, a lock waiter per lock key. Each event is set
        # (and replaced) when the key may have changed.
        self._changed: dict[str, asyncio.Event] = {}
        self._watchers: Counter[str] = Counter()
        self._readers: dict[str, int] = {}  # stream key -> the lowest ``after`` a blocked read waits beyond
        self._poller: asyncio.Task[None] | None = None
        self._busy_timeout = busy_timeout_seconds
        self._db = _connect(path, busy_timeout_seconds)  # at start-up, before the loop serves anyone
        self._thread = _DatabaseThread()

    # --- plumbing ------------------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._thread.run(_retry_while_busy, self._busy_timeout, fn, *args)
        except sqlite3.OperationalError as exc:
            # "database is locked" after busy_timeout, "disk I/O error", "database or disk is full": the caller may
            # try again; the detail is the operator's.
            log.warning("state file error", extra={"error": str(exc)})
            raise Unavailable("state store busy; try again shortly", retry_after=RETRY_AFTER_SECONDS) from None

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, *args)`` in one IMMEDIATE transaction (the write lock taken at once: no upgrade deadlock)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db, *args)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")  # all or nothing, so that trying it again is safe
            raise
        return result

    def _notify(self, key: str) -> None:
        self._readers.pop(key, None)
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()

    @contextmanager
    def _watching(self, key: str, after: int | None = None) -> Iterator[asyncio.Event]:
        """The event set when ``key`` may change next: a stream past ``after``, or a lock released. Taken *before*
        looking, so no change between the look and the wait is missed."""
        event = self._changed.get(key)
        if event is None:
            event = self._changed[key] = asyncio.Event()
        if after is not None:
            self._readers[key] = min(self._readers.get(key, after), after)
        self._watchers[key] += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        try:
            yield event
        finally:
            self._watchers[key] -= 1
            if not self._watchers[key]:
                del self._watchers[key]
                self._readers.pop(key, None)
                if self._changed.get(key) is event:
                    del self._changed[key]

    @staticmethod
    async def _wait(event: asyncio.Event, timeout: float) -> None:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass

    async def _poll(self) -> None:
        """While anyone waits: when another process committed (``PRAGMA data_version`` changed; commits of this
        connection do not change it: they notify directly), wake the blocked reads whose stream grew, in one query
        whatever their number, and the lock waiters."""
        version = None  # the first round looks: a commit before the poll started is not missed
        while self._watchers:
            await asyncio.sleep(self._poll_seconds)
            try:
                now = await self._run(_data_version, self._db)
                if now == version:
                    continue
                readers = dict(self._readers)
                newest = await self._run(_newest, self._db, list(readers)) if readers else {}
            except Unavailable:
                continue  # the file was locked past the timeout: the next round looks again
            version = now
            for key, after in readers.items():
                if newest.get(key, 0) > after:
                    self._notify(key)
            for key in [k for k in self._changed if k not in self._readers and k not in readers]:
                self._notify(key)  # a lock's waiters

    # --- hashes --------------------------------------------------------------------------------------------------

    async def hget(self, key: str, field: str) -> str | None:
        return await self._run(_one, self._db, "SELECT value FROM hashes WHERE key = ? AND field = ?", (key, field))

    async def hset(self, key: str, field: str, value: str) -> None:
        await self._run(_exec, self._db, "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?)", (key, field, value))

    async def hsetnx(self, key: str, field: str, value: str) -> bool:
        sql = "INSERT OR IGNORE INTO hashes VALUES (?, ?, ?)"
        return await self._run(_exec, self._db, sql, (key, field, value)) == 1

    async def hdel(self, key: str, field: str) -> bool:
        sql = "DELETE FROM hashes WHERE key = ? AND field = ?"
        return await self._run(_exec, self._db, sql, (key, field)) == 1

    async def hgetall(self, key: str) -> dict[str, str]:
        rows = await self._run(_all, self._db, "SELECT field, value FROM hashes WHERE key = ?", (key,))
        return dict(rows)

    async def hmget(self, key: str, fields: list[str]) -> list[str | None]:
        if not fields:
            return []
        return await self._run(_hmget, self._db, key, fields)

    # --- streams -------------------------------------------------------------------------------------------------

    async def append(self, key: str, value: str, maxlen: int) -> int:
        seq = await self._run(_append, self._db, key, value, maxlen)
        self._notify(key)
        return seq

    async def hincr(self, key: str, field: str) -> int:
        # One statement: the write lock is taken before the read, so two processes never get one number.
        sql = (
            "INSERT INTO hashes VALUES (?, ?, '1') ON CONFLICT (key, field) "
            "DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value"
        )
        return int(await self._run(_one, self._db, sql, (key, field)))

    async def write_many(
        self,
        hsets: Sequence[tuple[str, str, str]],
        appends: Sequence[tuple[str, str, int]],
        guard: tuple[str, str, str] | None = None,
    ) -> list[int] | None:
        seqs = await self._run(self._write, _write_many, hsets, appends, guard)
        if seqs is not None:
            for key, _, _ in appends:
                self._notify(key)
        return seqs

    async def read(self, key: str, after: int, count: int, block_seconds: float = 0) -> list[tuple[int, str]]:
        sql = "SELECT seq, value FROM streams WHERE key = ? AND seq > ? ORDER BY seq LIMIT ?"
        found: list[tuple[int, str]] = await self._run(_all, self._db, sql, (key, after, count))
        if found or block_seconds <= 0:
            return found
        deadline = time.monotonic() + block_seconds
        while (left := deadline - time.monotonic()) > 0:
            with self._watching(key, after) as changed:
                found = await self._run(_all, self._db, sql, (key, after, count))
                if found:
                    return found
                await self._wait(changed, left)
        return []

    async def tail(self, key: str, count: int) -> list[tuple[int, str]]:
        if count <= 0:
            return []
        sql = "SELECT seq, value FROM streams WHERE key = ? ORDER BY seq DESC LIMIT ?"
        rows: list[tuple[int, str]] = await self._run(_all, self._db, sql, (key, count))
        return rows[::-1]

    # --- expiring values -----------------------------------------------------------------------------------------

    async def get_expiring(self, key: str) -> str | None:
        sql = "SELECT value, expires_at FROM expiring WHERE key = ?"
        row = await self._run(_row, self._db, sql, (key,))
        if row is None:
            return None
        if row[1] <= self._clock():
            await self._run(self._write, _drop_expired, key, self._clock())
            return None
        return str(row[0])

    async def set_expiring(self, key: str, value: str, ttl_seconds: float) -> None:
        sweep = next(self._writes) % _SWEEP_EVERY == 0
        args = (key, value, ttl_seconds, self._clock(), self._max_expiring_bytes, sweep)
        await self._run(self._write, _set_expiring, *args)

    async def take_expiring(self, key: str) -> str | None:
        # One statement, so of two takers (any process) one gets the value, as with Redis's GETDEL.
        row = await self._run(self._write, _take_expiring, key)
        return None if row is None or row[1] <= self._clock() else str(row[0])

    # --- token buckets -------------------------------------------------------------------------------------------

    async def take_token(self, key: str, capacity: int, per_seconds: float) -> float:
        sweep = next(self._writes) % _SWEEP_EVERY == 0
        return await self._run(self._write, _take_token, key, capacity, per_seconds, self._clock(), sweep)

    # --- locks ---------------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def lock(self, key: str, ttl_seconds: float, wait_seconds: float) -> AsyncIterator[None]:
        # A row with an owner and an expiry: taken when absent or expired (its holder died), released only by its
        # owner, as redis-py's lock. A waiter wakes on a release in this process, or on the poll of other processes.
        owner = secrets.token_hex(8)
        deadline = time.monotonic() + wait_seconds
        while True:
            with self._watching(key) as released:
                now = self._clock()
                holder_expires = await self._run(_take_lock, self._db, key, owner, ttl_seconds, now)
                if holder_expires is None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable("a lock is held too long; try again shortly", retry_after=RETRY_AFTER_SECONDS)
                # Woken by a release, or when the holder's time is up (a holder that died releases nothing).
                await self._wait(released, min(left, max(holder_expires - now, 0.001)))
        try:
            yield
        finally:
            sql = "DELETE FROM locks WHERE key = ? AND owner = ?"
            if await self._run(_exec, self._db, sql, (key, owner)) == 0:
                log.warning("a lock expired before its holder released it", extra={"lock": key.rsplit(":", 1)[0]})
            self._notify(key)

    # --- the rest ------------------------------------------------------------------------------------------------

    async def ping(self) -> bool:
        return await self._run(_one, self._db, "SELECT 1", ()) == 1

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self._thread.run(self._db.close)
        await self._thread.stop()


def prepare_state_file(path: Path, busy_timeout_seconds: float = 5.0) -> None:
    """Create the state file and its schema, or raise :class:`StateFileError` saying why it cannot be used: what
    ``altan up`` does before it starts the services, so that a bad data directory stops it with one line."""
    _connect(path, busy_timeout_seconds).close()


class _DatabaseThread:
    """One thread that runs a backend's SQLite calls, in order.

    Cheaper than an executor (measured in docs/benchmarks.md, "Embedded state"): a job is a plain tuple on a queue,
    and the thread hands back every result it has ready in one wake-up of the event loop, so under load the cost of
    crossing threads is shared by many calls.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._work, name="altan-sqlite", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, args, future))
        return future

    async def stop(self) -> None:
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            batch = [jobs.get()]
            while not jobs.empty():
                batch.append(jobs.get_nowait())
            done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            stop = False
            for job in batch:
                if job is None:
                    stop = True
                    continue
                fn, args, future = job
                try:
                    done.append((future, fn(*args), None))
                except Exception as exc:  # handed to the awaiting coroutine
                    done.append((future, None, exc))
            if done:
                try:
                    done[0][0].get_loop().call_soon_threadsafe(_deliver, done)
                except RuntimeError:  # the loop is closed: nobody is left to answer
                    pass
            if stop:
                return


def _deliver(done: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in done:
        if future.done():  # its caller was cancelled: the call ran, nobody waits for it
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


# --- on the backend's thread --------------------------------------------------------------------------------------


def _connect(path: Path, busy_timeout_seconds: float) -> sqlite3.Connection:
    """Open (creating it, its directory and its schema) the state file; :class:`StateFileError` says why not."""
    if path.parent.exists() and not path.parent.is_dir():
        raise StateFileError(f"{path.parent} is not a directory")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            # The file holds every tenant's data (secrets encrypted): its owner's only. SQLite creates the -wal and
            # -shm files with the database's permissions.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        # Autocommit (isolation_level None): each statement is its own transaction unless BEGIN says otherwise.
        db = sqlite3.connect(path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise StateFileError(f"cannot open {path}: {_reason(exc)}") from None
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
        if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise StateFileError(f"cannot use {path}: its directory does not allow SQLite's write-ahead log")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        # From now on a locked file is waited for by _retry_while_busy, in finer steps than SQLite's.
        db.execute("PRAGMA busy_timeout = 0")
    except sqlite3.Error as exc:
        db.close()
        raise StateFileError(f"cannot use {path}: {_reason(exc)}") from None
    return db


def _retry_while_busy(timeout: float, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, tried again while another connection holds the write lock (the statement or transaction that
    found it so changed nothing), for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while True:
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        return "a part of the path is not a directory"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc)


def _one(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> Any:
    row = db.execute(sql, args).fetchone()
    return None if row is None else row[0]


def _row(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = db.execute(sql, args).fetchone()
    return row


def _all(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[Any]:
    return db.execute(sql, args).fetchall()


def _exec(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> int:
    return db.execute(sql, args).rowcount


def _data_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA data_version").fetchone()[0])


def _newest(db: sqlite3.Connection, keys: list[str]) -> dict[str, int]:
    """The number of each stream's last event."""
    newest: dict[str, int] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT key, max(seq) FROM streams WHERE key IN ({marks}) GROUP BY key"  # noqa: S608 (only "?" marks)
        newest.update(db.execute(sql, chunk).fetchall())
    return newest


def _hmget(db: sqlite3.Connection, key: str, fields: list[str]) -> list[str | None]:
    found: dict[str, str] = {}
    for start in range(0, len(fields), 500):  # under SQLite's limit of bound parameters
        chunk = fields[start : start + 500]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT field, value FROM hashes WHERE key = ? AND field IN ({marks})"  # noqa: S608 (only "?" marks)
        found.update(db.execute(sql, (key, *chunk)).fetchall())
    return [found.get(f) for f in fields]


def _append(db: sqlite3.Connection, key: str, value: str, maxlen: int) -> int:
    # One statement, so numbering is atomic across processes: a write statement takes the write lock before it
    # reads. The newest event is never trimmed, so the highest number of the stream is its last.
    sql = "INSERT INTO streams SELECT ?, coalesce(max(seq), 0) + 1, ? FROM streams WHERE key = ? RETURNING seq"
    seq = int(db.execute(sql, (key, value, key)).fetchone()[0])
    if seq > maxlen and seq % _TRIM_EVERY == 0:
        # Trimmed every few appends, as Redis's MAXLEN ~: a stream keeps up to _TRIM_EVERY - 1 more than maxlen.
        db.execute("DELETE FROM streams WHERE key = ? AND seq <= ?", (key, seq - maxlen))
    return seq


def _write_many(
    db: sqlite3.Connection,
    hsets: Sequence[tuple[str, str, str]],
    appends: Sequence[tuple[str, str, int]],
    guard: tuple[str, str, str] | None,
) -> list[int] | None:
    # Fenced: in the same transaction as the writes, so no later holder can take the fence in between.
    if guard is not None and _one(db, "SELECT value FROM hashes WHERE key = ? AND field = ?", guard[:2]) != guard[2]:
        return None
    db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?)", hsets)
    return [_append(db, key, value, maxlen) for key, value, maxlen in appends]


def _remove_expiring(db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> int:
    """Delete expiring values, keeping the running total of their sizes; how many went."""
    sizes = db.execute(f"DELETE FROM expiring WHERE {where} RETURNING size", args).fetchall()  # noqa: S608
    if sizes:
        db.execute("UPDATE expiring_total SET bytes = bytes - ?", (sum(s for (s,) in sizes),))
    return len(sizes)


def _drop_expired(db: sqlite3.Connection, key: str, now: float) -> None:
    _remove_expiring(db, "key = ? AND expires_at <= ?", (key, now))


def _set_expiring(
    db: sqlite3.Connection, key: str, value: str, ttl: float, now: float, max_bytes: int, sweep: bool
) -> None:
    _remove_expiring(db, "key = ?", (key,))
    size = len(value)
    db.execute("INSERT INTO expiring (key, value, expires_at, size) VALUES (?, ?, ?, ?)", (key, value, now + ttl, size))
    total = int(db.execute("UPDATE expiring_total SET bytes = bytes + ? RETURNING bytes", (size,)).fetchone()[0])
    if sweep:
        oldest_expired = "id IN (SELECT id FROM expiring WHERE expires_at <= ? LIMIT ?)"
        _remove_expiring(db, oldest_expired, (now, _SWEEP_ROWS))
        db.execute(
            "DELETE FROM buckets WHERE key IN (SELECT key FROM buckets WHERE expires_at <= ? LIMIT ?)",
            (now, _SWEEP_ROWS),
        )
        total = int(db.execute("SELECT bytes FROM expiring_total").fetchone()[0])
    # Past the budget, the oldest writes go first (ids grow with each write).
    while total > max_bytes:
        if not _remove_expiring(db, "id = (SELECT min(id) FROM expiring)", ()):
            break
        total = int(db.execute("SELECT bytes FROM expiring_total").fetchone()[0])


def _take_expiring(db: sqlite3.Connection, key: str) -> tuple[str, float] | None:
    row = db.execute("DELETE FROM expiring WHERE key = ? RETURNING value, expires_at, size", (key,)).fetchone()
    if row is None:
        return None
    db.execute("UPDATE expiring_total SET bytes = bytes - ?", (row[2],))
    return str(row[0]), float(row[1])


def _take_token(db: sqlite3.Connection, key: str, capacity: int, per_seconds: float, now: float, sweep: bool) -> float:
    row = db.execute("SELECT tokens, at FROM buckets WHERE key = ?", (key,)).fetchone()
    tokens, wait = token_bucket.take(None if row is None else (row[0], row[1]), now, capacity, per_seconds)
    # A bucket untouched for longer than it takes to refill is full again: its row may go (as Redis's PEXPIRE).
    db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?)", (key, tokens, now, now + per_seconds + 1))
    if sweep:
        db.execute(
            "DELETE FROM buckets WHERE key IN (SELECT key FROM buckets WHERE expires_at <= ? LIMIT ?)",
            (now, _SWEEP_ROWS),
        )
    return wait


def _take_lock(db: sqlite3.Connection, key: str, owner: str, ttl: float, now: float) -> float | None:
    """None when taken, else when the current holder's lock expires."""
    # One statement: absent, or expired (a holder that died), becomes ours; held by a live owner, nothing changes.
    sql = (
        "INSERT INTO locks VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, "
        "expires_at = excluded.expires_at WHERE locks.expires_at <= ?"
    )
    if db.execute(sql, (key, owner, now + ttl, now)).rowcount == 1:
        return None
    expires = _one(db, "SELECT expires_at FROM locks WHERE key = ?", (key,))
    return now if expires is None else float(expires)
