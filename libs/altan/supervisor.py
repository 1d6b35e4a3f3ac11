"""Supervision of the processes of ``altan up``, as Kubernetes supervises a pod's container.

A service that exits while the stack runs (a crash, SIGKILL, the OOM killer) is started again with the same command
and environment, so on the same ports and settings, after an exponential backoff: 0.5 s, doubling up to 30 s, and
back to 0.5 s once a run has lasted a minute. A service that keeps exiting right after it starts is in a crash loop
(Kubernetes' CrashLoopBackOff): it is still tried again at the capped delay, and each exit says so in one line.
Only a stop that was asked for (Ctrl-C, SIGTERM) ends supervision.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Backoff", "ServiceProcess", "describe_exit"]

_PIPE_LIMIT = 1024 * 1024
_COLORS = {"tool": "36", "integrator": "35", "agent": "33", "gateway": "32"}


@dataclass(frozen=True)
class Backoff:
    """How long to wait before starting a service again, after how many exits in a row."""

    initial_seconds: float = 0.5
    max_seconds: float = 30.0
    # A run at least this long was healthy: the next exit starts the backoff again from ``initial_seconds``.
    stable_seconds: float = 60.0

    def delay(self, exits_in_a_row: int) -> float:
        return min(self.initial_seconds * 2 ** max(exits_in_a_row - 1, 0), self.max_seconds)


def describe_exit(returncode: int) -> str:
    """``exited with status 1``, or ``was killed by SIGKILL`` for a process a signal ended."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _say(line: str) -> None:
    print(f"altan: {line}", file=sys.stderr, flush=True)


async def _relay(label: str, stream: asyncio.StreamReader) -> None:
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line over the reader's limit: pass on what there is, keep draining
            line = await stream.read(_PIPE_LIMIT)
        if not line:
            return
        sys.stdout.write(label + line.decode(errors="replace"))
        sys.stdout.flush()


class ServiceProcess:
    """One service of the stack: its current process, its relayed log lines, and its restarts."""

    def __init__(
        self, name: str, command: Sequence[str], env: dict[str, str], *, color: bool, backoff: Backoff
    ) -> None:
        self.name = name
        self._command = tuple(command)
        self._env = env
        self._label = f"\x1b[{_COLORS.get(name, '0')}m{name:>10} |\x1b[0m " if color else f"{name:>10} | "
        self._backoff = backoff
        self.process: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._started_at = 0.0
        self._relays: list[asyncio.Task[None]] = []

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self._command,
            env=self._env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=_PIPE_LIMIT,
        )
        self._started_at = time.monotonic()
        self._exited = asyncio.create_task(self.process.wait())
        if self.process.stdout is not None:
            self._relays.append(asyncio.create_task(_relay(self._label, self.process.stdout)))

    async def exited(self) -> int:
        """Wait until the current process exits; its exit status (negative: the signal that ended it)."""
        assert self._exited is not None, "start() first"
        return await self._exited

    async def supervise(self, stop: asyncio.Event) -> None:
        """Start the service again each time it exits, until ``stop`` is set."""
        exits_in_a_row = 0
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                assert self._exited is not None and self.process is not None, "start() first"
                await asyncio.wait([self._exited, stopping], return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    return
                uptime = time.monotonic() - self._started_at
                exits_in_a_row = 1 if uptime >= self._backoff.stable_seconds else exits_in_a_row + 1
                delay = self._backoff.delay(exits_in_a_row)
                line = (
                    f"{self.name} (pid {self.process.pid}) {describe_exit(self.process.returncode or 0)} "
                    f"after {uptime:.1f} s; restarting it in {delay:g} s"
                )
                if exits_in_a_row > 1:
                    line += (
                        f" (crash loop: {_ordinal(exits_in_a_row)} exit in a row, "
                        f"backing off up to {self._backoff.max_seconds:g} s)"
                    )
                _say(line)
                await asyncio.wait([stopping], timeout=delay)
                if stop.is_set():
                    _say(f"{self.name} not restarted: stopping")
                    return
                await self.start()
                _say(f"{self.name} restarted (pid {self.process.pid})")
        finally:
            stopping.cancel()

    def terminate(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def closed(self) -> None:
        """Wait until the last process has exited and every log line was relayed."""
        await asyncio.gather(*(t for t in (self._exited, *self._relays) if t is not None), return_exceptions=True)
