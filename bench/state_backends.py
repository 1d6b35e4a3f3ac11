"""CPU per state operation of the embedded backends, in one process: ``python bench/state_backends.py``.

What docs/benchmarks.md ("Embedded state") reports: each operation of :class:`altan.store.MemoryBackend` and
:class:`altan.store.SqliteBackend` at 1 and 16 in flight, and what it costs to hand a SQLite call to another thread
(the reason the backend has a thread of its own rather than an executor or ``asyncio.to_thread``).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sqlite3
import tempfile
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from altan.store import MemoryBackend, SqliteBackend, StateBackend

VALUE = "x" * 512  # about a small task document or event
FENCE = ("fences", "task", "1")  # a task's fence, held: every fenced write goes through


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(op: Callable[[int], Awaitable[Any]], count: int, in_flight: int) -> float:
    """Microseconds of this process's CPU per call, all threads included."""
    for i in range(min(200, count)):
        await op(i)

    async def worker(start: int) -> None:
        for i in range(start, count, in_flight):
            await op(i)

    before = _cpu()
    await asyncio.gather(*(worker(n) for n in range(in_flight)))
    return (_cpu() - before) * 1e6 / count


def _operations(backend: StateBackend) -> dict[str, Callable[[int], Awaitable[Any]]]:
    return {
        "hget": lambda i: backend.hget("h", "f"),
        "hset": lambda i: backend.hset("h", f"f{i % 100}", VALUE),
        "hsetnx": lambda i: backend.hsetnx("n", f"f{i}", VALUE),
        "hset_if (fenced hset; issue 9)": lambda i: backend.write_many([("h", f"f{i % 100}", VALUE)], [], FENCE),
        "append": lambda i: backend.append(f"s{i % 16}", VALUE, 10_000),
        "append_if (fenced append)": lambda i: backend.write_many([], [(f"s{i % 16}", VALUE, 10_000)], FENCE),
        "read (after the last 10)": lambda i: backend.read("s0", 0, 10),
        "set_expiring": lambda i: backend.set_expiring(f"e{i % 100}", VALUE, 60),
        "take_token": lambda i: backend.take_token("b", 1_000_000_000, 1),
    }


async def _hops(path: Path, count: int) -> dict[str, float]:
    """A primary-key SELECT on the state file: on the event loop (blocking it), and handed to another thread."""
    local = threading.local()

    def query() -> Any:
        db = getattr(local, "db", None)
        if db is None:
            db = local.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        return db.execute("SELECT value FROM hashes WHERE key = ? AND field = ?", ("h", "f")).fetchone()

    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)

    async def on_loop(_: int) -> Any:
        return query()

    backend = SqliteBackend(path)
    try:
        return {
            "on the event loop (blocks it)": await _measure(on_loop, count, 1),
            "loop.run_in_executor, one thread": await _measure(
                lambda _: loop.run_in_executor(executor, query), count, 1
            ),
            "asyncio.to_thread": await _measure(lambda _: asyncio.to_thread(query), count, 1),
            "SqliteBackend's thread (hget)": await _measure(lambda _: backend.hget("h", "f"), count, 1),
        }
    finally:
        executor.shutdown()
        await backend.aclose()


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.db"
        rows: dict[str, list[float]] = {}
        for make in (MemoryBackend, lambda: SqliteBackend(path)):
            backend: StateBackend = make()
            await backend.hset("h", "f", VALUE)
            await backend.hincr("fences", "task")
            for name, op in _operations(backend).items():
                for in_flight in (1, 16):
                    rows.setdefault(name, []).append(await _measure(op, count, in_flight))
            await backend.aclose()
        print("| operation | memory @1 (µs) | memory @16 (µs) | SQLite @1 (µs) | SQLite @16 (µs) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, values in rows.items():
            print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
        print()
        print("| one SQLite read, one at a time | CPU per call (µs) |")
        print("| --- | ---: |")
        for name, value in (await _hops(path, count)).items():
            print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="calls per measurement")
    asyncio.run(main(parser.parse_args().count))
