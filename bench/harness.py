"""What every benchmark needs: the stack and the fake API as real processes, their CPU, and bounded load loops.

The stack is started the way a developer starts it (``altan up`` in a subprocess, embedded state unless a Redis
URL is given) but at the default log level: the end-to-end harness's DEBUG logging would be measured too.
CPU is read from ``/proc/<pid>/stat`` (utime + stime), so no dependency beyond the project's own is needed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt

from tests.e2e.stack import service_pids

__all__ = [
    "CpuMeter",
    "Phase",
    "Processes",
    "closed_loop",
    "cpu_model",
    "cpu_ticks",
    "free_port",
    "memory_kib",
    "percentile",
    "start_processes",
]

REPO = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot, from /proc/stat: a VM's neighbours show up as steal."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def memory_kib(pid: int) -> dict[str, int]:
    """Resident memory of one process from ``/proc/<pid>/status``: ``VmRSS`` now, ``VmHWM`` its peak so far (KiB)."""
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    except OSError:
        pass
    return found


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # fields 14 and 15 of proc(5), counted after the name


@dataclass
class Processes:
    """The running stack (``altan up`` and its four services) and the fake third-party API."""

    stack: subprocess.Popen[bytes]
    fake: subprocess.Popen[bytes]
    http_port: int
    fake_port: int
    secret: str
    workdir: Path
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # the internal gRPC ports, by service name
    llm: subprocess.Popen[bytes] | None = None  # bench/mock_llm.py, when asked for
    llm_port: int = 0
    mcp: subprocess.Popen[bytes] | None = None  # bench/mcp_server.py, when asked for
    mcp_port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def fake_url(self) -> str:
        return f"http://127.0.0.1:{self.fake_port}"

    @property
    def llm_url(self) -> str:
        """The mock LLM's Chat Completions endpoint (``bench/mock_llm.py``)."""
        return f"http://127.0.0.1:{self.llm_port}/v1/chat/completions"

    @property
    def mcp_url(self) -> str:
        """The MCP server's streamable HTTP endpoint (``bench/mcp_server.py``)."""
        return f"http://127.0.0.1:{self.mcp_port}/mcp"

    def token(self, tenant: str) -> str:
        now = int(time.time())
        claims = {"tenant_id": tenant, "sub": "bench", "role": "admin", "aud": "altan", "iss": "altan-dev"}
        return jwt.encode({**claims, "iat": now, "exp": now + 3600}, self.secret, algorithm="HS256")

    def log_tail(self, chars: int = 4000) -> str:
        return (self.workdir / "stack.log").read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        children = [p for p in (self.stack, self.fake, self.llm, self.mcp) if p is not None]
        for proc in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def start_processes(
    *,
    redis_url: str | None = None,
    startup_timeout: float = 60.0,
    egress_allow: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    fake_delay_ms: float = 0.0,
    llm_delay_ms: float | None = None,
    mcp_server: bool = False,
    tls: bool = False,
    code: Path = REPO,
) -> Processes:
    """Start the fake API and ``altan up`` on free ports; return once the gateway answers /readyz.

    ``egress_allow`` adds ``host:port`` destinations to the fake API's in ``ALTAN_EGRESS_ALLOW`` (a mock LLM);
    ``extra_env`` is added to the stack's environment (an install's LLM key and its hosts, say).
    ``fake_delay_ms``: how long the fake API takes to answer. ``llm_delay_ms``: also start the mock LLM
    (``bench/mock_llm.py``) answering after that long, which the stack may reach and sends the install's OpenAI key,
    as it would to a provider. ``mcp_server``: also start the MCP server (``bench/mcp_server.py``), which the stack
    may reach. ``tls``: ``altan up --tls``, mutual TLS between the services. ``code``: the source tree the stack runs
    from (another revision's, to compare with; its ``libs`` and services come first on the path), with this one's
    environment.
    """
    workdir = Path(tempfile.mkdtemp(prefix="altan-bench-"))
    fake_port, http_port, grpc_port = free_port(), free_port(), free_port()
    fake = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "fake_api.py"), str(fake_port), "--delay-ms", str(fake_delay_ms)],
        stdout=subprocess.DEVNULL,
    )
    llm, llm_port = None, 0
    if llm_delay_ms is not None:
        llm_port = free_port()
        command = [sys.executable, str(REPO / "bench" / "mock_llm.py"), str(llm_port), "--delay-ms", str(llm_delay_ms)]
        llm = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        egress_allow = [*egress_allow, f"127.0.0.1:{llm_port}"]
    mcp, mcp_port = None, 0
    if mcp_server:
        mcp_port = free_port()
        mcp = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "mcp_server.py"), str(mcp_port)], stdout=subprocess.DEVNULL
        )
        egress_allow = [*egress_allow, f"127.0.0.1:{mcp_port}"]
    secret = base64.b64encode(secrets.token_bytes(48)).decode()
    ports = {"agent": free_port(), "tool": free_port(), "integrator": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTAN_") and k != "REDIS_URL"}
    env.update(
        ALTAN_JWT_SECRET=secret,
        ALTAN_DATA_DIR=str(workdir / "data"),
        ALTAN_EGRESS_ALLOW=",".join([f"127.0.0.1:{fake_port}", *egress_allow]),
        ALTAN_AGENT_PORT=str(ports["agent"]),
        ALTAN_TOOL_PORT=str(ports["tool"]),
        ALTAN_INTEGRATOR_PORT=str(ports["integrator"]),
    )
    if llm is not None:
        env.update(ALTAN_OPENAI_API_KEY="sk-bench-install-key", ALTAN_OPENAI_API_HOSTS="127.0.0.1")
    env.update(extra_env or {})
    if redis_url:
        env["REDIS_URL"] = redis_url
    if code != REPO:
        env["PYTHONPATH"] = os.pathsep.join([str(code / "libs"), str(code)])
    with (workdir / "stack.log").open("wb") as log:  # the child keeps its own descriptor
        stack = subprocess.Popen(
            [
                *(sys.executable, "-m", "altan.cli", "up"),
                *("--http-port", str(http_port), "--grpc-port", str(grpc_port)),
                *(["--tls"] if tls else []),
            ],
            env=env,
            cwd=code,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Processes(
        stack,
        fake,
        http_port,
        fake_port,
        secret,
        workdir,
        ports=ports,
        llm=llm,
        llm_port=llm_port,
        mcp=mcp,
        mcp_port=mcp_port,
    )
    extras = [(p, port) for p, port in ((llm, llm_port), (mcp, mcp_port)) if p is not None]
    deadline = time.monotonic() + startup_timeout
    with httpx.Client(timeout=2, trust_env=False) as client:
        while time.monotonic() < deadline:
            if stack.poll() is not None or fake.poll() is not None or any(p.poll() is not None for p, _ in extras):
                break
            try:
                ready = client.get(f"{running.base_url}/readyz").status_code == 200
                for _, port in extras:
                    socket.create_connection(("127.0.0.1", port), timeout=2).close()
                if ready and client.get(f"{running.fake_url}/ping").status_code == 200:
                    running.pids = service_pids(stack.pid)
                    return running
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.2)
    log_tail = running.log_tail()
    running.stop()
    raise RuntimeError(f"the stack did not become ready:\n{log_tail}")


class CpuMeter:
    """CPU seconds spent by each process of interest between :meth:`start` and :meth:`stop`.

    ``extra`` names more processes to count, started by the benchmark itself (a mock LLM, a proxy to compare with);
    the mock LLM started with the stack is counted as ``mock llm``.
    """

    def __init__(self, processes: Processes, extra: Mapping[str, int] | None = None) -> None:
        self._pids = {**processes.pids, "altan up": processes.stack.pid, "fake api": processes.fake.pid}
        if processes.llm is not None:
            self._pids["mock llm"] = processes.llm.pid
        if processes.mcp is not None:
            self._pids["mcp server"] = processes.mcp.pid
        self._pids.update(extra or {})
        self._before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: _cpu_seconds(pid) for name, pid in self._pids.items()}
        now["load generator"] = time.process_time()
        return now

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> dict[str, float]:
        after = self._now()
        return {name: after[name] - self._before[name] for name in after}


@dataclass
class Phase:
    """One bounded run of one operation at a fixed number in flight."""

    concurrency: int
    latencies: list[float]
    elapsed: float
    cpu: dict[str, float]

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.count / self.elapsed

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    def cpu_ms_per_op(self, *names: str) -> float:
        return 1000 * sum(self.cpu.get(n, 0.0) for n in names) / self.count


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def closed_loop(
    operations: Sequence[Callable[[], Awaitable[None]]],
    *,
    max_ops: int,
    max_seconds: float,
    meter: CpuMeter | None = None,
) -> Phase:
    """Run each operation in a loop of its own, all at once, until ``max_ops`` started or ``max_seconds`` passed.

    One operation per in-flight slot, so each may own its connections; the concurrency is their number.
    """
    latencies: list[float] = []
    started = 0
    deadline = time.monotonic() + max_seconds

    async def worker(operation: Callable[[], Awaitable[None]]) -> None:
        nonlocal started
        while started < max_ops and time.monotonic() < deadline:
            started += 1
            t0 = time.perf_counter()
            await operation()
            latencies.append(time.perf_counter() - t0)

    if meter is not None:
        meter.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(op) for op in operations))
    elapsed = time.perf_counter() - t0
    cpu = meter.stop() if meter is not None else {}
    return Phase(len(operations), latencies, elapsed, cpu)
