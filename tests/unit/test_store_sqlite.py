"""altan.store_sqlite: what only the embedded SQLite state does. Several *processes* share one file (as the services of
``altan up`` do) with the atomicity callers rely on from Redis; the state outlives the process; expiring values expire
and stay within their budget; the event loop never waits for SQLite. The behaviour all backends share is in
test_store.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from altan.config import ConfigurationError, Settings
from altan.errors import Unavailable
from altan.store import MemoryBackend, SqliteBackend, open_state
from altan.store_sqlite import StateFileError

# A process of its own on the state file: argv[1] the file, argv[2] what to do, argv[3:] its arguments. It prints one
# JSON line with its answer.
_WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from altan.store import SqliteBackend

    async def main(path, what, *args):
        backend = SqliteBackend(Path(path))
        try:
            if what == "append":
                out = [await backend.append(args[0], f"v{i}", 100_000) for i in range(int(args[1]))]
            elif what == "hsetnx":
                out = await backend.hsetnx(args[0], "field", args[1])
            elif what == "take":
                out = await backend.take_expiring(args[0])
            elif what == "tokens":
                out = [await backend.take_token(args[0], int(args[1]), 3600) for _ in range(int(args[2]))]
            elif what == "hold":  # take a lock, say so, and never release it: the process is killed holding it
                async with backend.lock(args[0], float(args[1]), 5):
                    print(json.dumps("held"), flush=True)
                    await asyncio.Event().wait()
            print(json.dumps(out), flush=True)
        finally:
            await backend.aclose()

    asyncio.run(main(*sys.argv[1:]))
    """
)


def worker(path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def answers(processes: list[subprocess.Popen[str]]) -> list[object]:
    out = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        out.append(json.loads(stdout))
    return out


def create(path: Path) -> None:
    async def open_and_close() -> None:
        await SqliteBackend(path).aclose()

    asyncio.run(open_and_close())


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


# --- several processes on one file ---------------------------------------------------------------------------------


def test_appends_of_several_processes_are_numbered_once_each_in_order(state_file: Path) -> None:
    create(state_file)  # the schema, before the writers race
    numbers = answers([worker(state_file, "append", "k", "150") for _ in range(4)])
    seen = [n for each in numbers for n in each]  # type: ignore[attr-defined]
    assert sorted(seen) == list(range(1, 601))
    assert all(each == sorted(each) for each in numbers)  # type: ignore[type-var]

    async def check() -> None:
        backend = SqliteBackend(state_file)
        try:
            events = await backend.read("k", 0, 1000)
            assert [seq for seq, _ in events] == list(range(1, 601))
        finally:
            await backend.aclose()

    asyncio.run(check())


def test_of_processes_racing_for_one_id_exactly_one_stores_it(state_file: Path) -> None:
    create(state_file)
    won = answers([worker(state_file, "hsetnx", "idem", f"writer-{i}") for i in range(6)])
    assert won.count(True) == 1

    async def check() -> str | None:
        backend = SqliteBackend(state_file)
        try:
            return await backend.hget("idem", "field")
        finally:
            await backend.aclose()

    assert asyncio.run(check()) == f"writer-{won.index(True)}"


def test_of_processes_taking_one_expiring_value_exactly_one_gets_it(state_file: Path) -> None:
    async def put() -> None:
        backend = SqliteBackend(state_file)
        await backend.set_expiring("state", "the-verifier", 60)
        await backend.aclose()

    asyncio.run(put())
    got = answers([worker(state_file, "take", "state") for _ in range(6)])
    assert got.count("the-verifier") == 1
    assert got.count(None) == 5


def test_a_bucket_shared_by_processes_lets_exactly_its_capacity_through(state_file: Path) -> None:
    create(state_file)
    waits = [w for each in answers([worker(state_file, "tokens", "b", "25", "20") for _ in range(3)]) for w in each]  # type: ignore[attr-defined]
    assert sum(1 for w in waits if w == 0) == 25
    assert len(waits) == 60


async def test_a_blocked_read_wakes_on_another_processes_append_within_the_poll(state_file: Path) -> None:
    backend = SqliteBackend(state_file, poll_seconds=0.05)
    try:
        reader = asyncio.create_task(backend.read("events", 0, 10, block_seconds=20))
        done, _ = await asyncio.wait({reader}, timeout=0.2)
        assert not done
        started = time.monotonic()
        writer = worker(state_file, "append", "events", "1")
        found = await asyncio.wait_for(reader, 15)
        woke_after = time.monotonic() - started
        assert found == [(1, "v0")]
        await asyncio.to_thread(answers, [writer])
        # The writer's interpreter takes most of that; a poll that never saw the commit would take 20 s.
        assert woke_after < 10
    finally:
        await backend.aclose()


async def test_a_commit_elsewhere_wakes_only_the_reads_whose_stream_grew(state_file: Path) -> None:
    backend = SqliteBackend(state_file, poll_seconds=0.05)
    elsewhere = SqliteBackend(state_file)  # another connection: commits this one's poll must notice
    reads: list[str] = []
    run = backend._run

    async def counting_run(fn: Any, *args: Any) -> Any:
        if args[1:2] and isinstance(args[1], str) and args[1].startswith("SELECT seq, value"):
            reads.append(args[2][0])
        return await run(fn, *args)

    backend._run = counting_run  # type: ignore[method-assign]
    try:
        readers = {f"s{n}": asyncio.create_task(backend.read(f"s{n}", 0, 10, block_seconds=20)) for n in range(50)}
        deadline = time.monotonic() + 10
        while len(set(reads)) < 50:  # until every reader looked once and waits
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert not any(t.done() for t in readers.values())
        reads.clear()
        await elsewhere.append("s7", "hello", 10)
        assert await asyncio.wait_for(readers.pop("s7"), 5) == [(1, "hello")]
        assert reads == ["s7"]  # the other 49 were not woken to look again
        assert not any(t.done() for t in readers.values())
        for task in readers.values():
            task.cancel()
        await asyncio.gather(*readers.values(), return_exceptions=True)
    finally:
        await elsewhere.aclose()
        await backend.aclose()


async def test_a_lock_held_in_another_process_is_waited_for_and_freed_by_its_ttl_when_that_process_dies(
    state_file: Path,
) -> None:
    holder = worker(state_file, "hold", "lock:refresh", "2")
    assert holder.stdout is not None
    assert json.loads(await asyncio.to_thread(holder.stdout.readline)) == "held"
    backend = SqliteBackend(state_file)
    try:
        with pytest.raises(Unavailable):
            async with backend.lock("lock:refresh", 2, 0.2):
                pytest.fail("took a lock another process holds")
        holder.kill()  # dies holding it: nothing releases it but its TTL
        holder.communicate(timeout=10)
        started = time.monotonic()
        async with backend.lock("lock:refresh", 2, 5):
            waited = time.monotonic() - started
        assert waited < 2.5
    finally:
        await backend.aclose()


async def test_locks_of_one_process_exclude_each_other_and_a_release_wakes_the_next(state_file: Path) -> None:
    backend = SqliteBackend(state_file, poll_seconds=30)  # no poll can help: the release itself must wake
    inside: list[int] = []
    log: list[str] = []

    async def critical(n: int) -> None:
        async with backend.lock("lock:x", 30, 10):
            inside.append(n)
            assert len(inside) == 1
            log.append(f"in {n}")
            await asyncio.sleep(0)
            inside.remove(n)

    try:
        started = time.monotonic()
        await asyncio.gather(*(critical(n) for n in range(5)))
        assert len(log) == 5
        assert time.monotonic() - started < 5
    finally:
        await backend.aclose()


# --- lasting, expiring, bounded ------------------------------------------------------------------------------------


async def test_everything_stored_is_there_after_the_process_reopens_the_file(state_file: Path) -> None:
    backend = SqliteBackend(state_file)
    await backend.hset("agents", "a1", '{"name": "kept"}')
    await backend.append("events", "e1", 100)
    await backend.set_expiring("cache", "v", 60)
    await backend.take_token("bucket", 1, 3600)
    await backend.aclose()

    again = SqliteBackend(state_file)
    try:
        assert await again.hget("agents", "a1") == '{"name": "kept"}'
        assert await again.read("events", 0, 10) == [(1, "e1")]
        assert await again.append("events", "e2", 100) == 2  # numbering goes on
        assert await again.get_expiring("cache") == "v"
        assert await again.take_token("bucket", 1, 3600) > 0  # the bucket stayed empty
    finally:
        await again.aclose()


async def test_the_state_file_is_its_owners_only(tmp_path: Path) -> None:
    state_file = tmp_path / "not" / "yet" / "state.db"  # its directory is created too
    backend = SqliteBackend(state_file)
    await backend.hset("k", "f", "v")
    try:
        for path in state_file.parent.iterdir():  # state.db and SQLite's -wal and -shm
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        await backend.aclose()


async def test_expiring_values_expire_for_every_process_and_are_swept(state_file: Path) -> None:
    now = [1000.0]
    first = SqliteBackend(state_file, clock=lambda: now[0])
    second = SqliteBackend(state_file, clock=lambda: now[0])
    try:
        await first.set_expiring("short", "1", 5)
        await first.set_expiring("long", "2", 50)
        assert await second.get_expiring("short") == "1"
        now[0] += 5
        assert (await second.get_expiring("short"), await second.get_expiring("long")) == (None, "2")
        assert await second.take_expiring("long") == "2"
        await first.set_expiring("gone", "x", 1)
        now[0] += 10
        assert await first.take_expiring("gone") is None  # expired: never handed out
        # Expired rows nobody reads again go in the sweeps that writes make.
        for i in range(300):
            await first.set_expiring(f"stale-{i}", "x", 1)
        now[0] += 10
        for i in range(450):
            await first.set_expiring(f"fresh-{i}", "x", 60)
        left = await asyncio.to_thread(_count, state_file, "SELECT count(*) FROM expiring WHERE key LIKE 'stale-%'")
        assert left == 0
    finally:
        await first.aclose()
        await second.aclose()


async def test_expiring_values_keep_within_their_budget_oldest_first(state_file: Path) -> None:
    # As MemoryBackend (test_store.py): b, the oldest, goes when d passes the budget.
    backend = SqliteBackend(state_file, max_expiring_bytes=10)
    memory = MemoryBackend(max_expiring_bytes=10)
    try:
        for each in (backend, memory):
            await each.set_expiring("b", "12345", 50)
            await each.set_expiring("c", "123", 50)
            await each.set_expiring("c", "123", 50)  # a rewrite counts once
            await each.set_expiring("d", "1234567", 50)
            assert [await each.get_expiring(k) for k in "bcd"] == [None, "123", "1234567"]
        total = await asyncio.to_thread(_count, state_file, "SELECT bytes FROM expiring_total")
        assert total == 10
    finally:
        await backend.aclose()


async def test_streams_trim_every_few_appends_and_buckets_refill(state_file: Path) -> None:
    now = [0.0]
    backend = SqliteBackend(state_file, clock=lambda: now[0])
    try:
        for i in range(1, 65):
            await backend.append("k", str(i), 3)
            kept = len(await backend.read("k", 0, 1000))
            assert kept <= 3 + 31  # as Redis's MAXLEN ~: somewhat more than maxlen, never unbounded
        assert await backend.read("k", 0, 100) == [(62, "62"), (63, "63"), (64, "64")]  # the 32nd append trims
        assert [await backend.take_token("b", 2, 10) for _ in range(3)] == [0, 0, 5.0]
        now[0] = 5.0
        assert [await backend.take_token("b", 2, 10) for _ in range(2)] == [0, 5.0]
    finally:
        await backend.aclose()


# --- never on the event loop; clear failures ------------------------------------------------------------------------


async def test_the_event_loop_runs_while_another_process_holds_the_write_lock(state_file: Path) -> None:
    import sqlite3

    backend = SqliteBackend(state_file)
    blocker = sqlite3.connect(state_file, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the write lock, as a long writer elsewhere holds it
    try:
        write = asyncio.create_task(backend.hset("k", "f", "v"))
        ticks = 0
        while not write.done() and ticks < 20:
            await asyncio.sleep(0.01)  # the loop is free while the write waits for the lock
            ticks += 1
        assert ticks == 20 and not write.done()
        blocker.execute("COMMIT")
        await asyncio.wait_for(write, 10)
        assert await backend.hget("k", "f") == "v"
    finally:
        blocker.close()
        await backend.aclose()


async def test_a_write_that_waits_out_the_busy_timeout_is_unavailable(state_file: Path) -> None:
    import sqlite3

    backend = SqliteBackend(state_file, busy_timeout_seconds=0.2)
    blocker = sqlite3.connect(state_file, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Unavailable) as caught:
            await backend.append("k", "v", 10)
        assert caught.value.retry_after == pytest.approx(1.0)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        await backend.aclose()


def test_a_directory_that_cannot_hold_the_file_is_a_clear_start_up_error(tmp_path: Path) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o500)
    if os.access(read_only, os.W_OK):
        read_only = Path("/sys")  # root may write any mode; not into sysfs
    with pytest.raises(StateFileError, match=re.escape(f"cannot open {read_only / 'state.db'}: permission denied")):
        SqliteBackend(read_only / "state.db")
    settings = Settings(jwt_secret="x" * 32, data_dir=read_only)
    with pytest.raises(ConfigurationError, match=r"^ALTAN_DATA_DIR: cannot open .*: permission denied$"):
        open_state(settings)


def test_a_data_dir_that_is_a_file_is_a_clear_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateFileError, match=re.escape(f"{tmp_path / 'file'} is not a directory")):
        SqliteBackend(tmp_path / "file" / "state.db")
    with pytest.raises(StateFileError, match="a part of the path is not a directory"):
        SqliteBackend(tmp_path / "file" / "deeper" / "state.db")


def test_a_file_that_is_not_a_database_is_a_clear_start_up_error(state_file: Path) -> None:
    state_file.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StateFileError, match=re.escape(f"cannot use {state_file}: file is not a database")):
        create(state_file)


def test_settings_choose_the_file_memory_or_redis(tmp_path: Path) -> None:
    base = {"jwt_secret": "x" * 32, "data_dir": tmp_path}
    assert Settings(**base).state_file() == tmp_path / "state.db"
    assert Settings(**base, state="memory").state_file() is None
    assert Settings(**base, redis_url="redis://127.0.0.1:6379/0").state_file() is None
    with pytest.raises(ValueError, match="ALTAN_STATE=memory and REDIS_URL: choose one"):
        Settings(**base, state="memory", redis_url="redis://127.0.0.1:6379/0")


def _count(path: Path, sql: str) -> int:
    import sqlite3

    with sqlite3.connect(path) as db:
        return int(db.execute(sql).fetchone()[0])
