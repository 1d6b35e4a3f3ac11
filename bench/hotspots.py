"""Where each service spends its CPU on one path: ``python bench/hotspots.py [PATH] [--seconds N]``.

Starts the stack as ``bench/run.py`` does, drives PATH (default ``custom``) at many in flight, and samples every
service with py-spy meanwhile (``pip install py-spy``: a profiling tool, not a dependency of the benchmark).
Prints, per service, the functions with the most samples on top of the stack (self), and the project's own
functions and the areas (logging, JWT, gRPC, HTTP server...) with the most samples anywhere on the stack
(inclusive). The raw collapsed stacks stay
in the work directory for a flame graph (``flamegraph.pl`` or speedscope).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/hotspots.py` from anywhere

from bench.harness import REPO, Processes, closed_loop, start_processes
from bench.scenarios import Worker, prepare

SERVICES = ("gateway", "integrator", "tool", "agent")
_SITE = sysconfig.get_paths()["purelib"]
# Areas a stack can spend time in (inclusive, so they overlap): a frame whose "function (file" contains the text.
AREAS = {
    "logging (stdlib logging + altan.logging)": ("stdlib/logging/", "libs/altan/logging.py"),
    "JWT verification (TokenVerifier.verify)": ("TokenVerifier.verify (",),
    "JSON encode/decode (stdlib json)": ("stdlib/json/",),
    "gRPC Python layer (grpc/)": ("(grpc/",),
    "uvicorn (HTTP server)": ("(uvicorn/",),
    "h11 (HTTP/1.1 parser of uvicorn and httpcore)": ("(h11/",),
    "starlette + fastapi": ("(starlette/", "(fastapi/"),
    "sse-starlette": ("(sse_starlette/",),
    "httpx + httpcore (outbound HTTP client)": ("(httpx/", "(httpcore/"),
    "anyio (under httpcore and sse-starlette)": ("(anyio/",),
    "mcp client (the official SDK)": ("(mcp/",),
    "thread pool hand-offs (asyncio.to_thread)": ("to_thread (",),
    "failed imports at run time (importlib)": ("_find_and_load (",),
    "prometheus_client": ("(prometheus_client/",),
    "tenacity": ("(tenacity/",),
    "pydantic": ("(pydantic/", "(pydantic_core/"),
    "jsonschema": ("(jsonschema/",),
    "cryptography": ("(cryptography/",),
    "state store (altan.store)": ("libs/altan/store.py",),
    "audit (AuditLog.record)": ("AuditLog.record (",),
    "egress guard (EgressGuard.check)": ("EgressGuard.check (",),
}
_STDLIB = sysconfig.get_paths()["stdlib"]


def _short(path: str) -> str:
    for prefix, label in ((_SITE + "/", ""), (_STDLIB + "/", "stdlib/"), (str(REPO) + "/", "")):
        if path.startswith(prefix):
            return label + path[len(prefix) :]
    return path


def _frames(stack: str) -> list[tuple[str, str]]:
    """(function, file:line) of each frame of one collapsed py-spy stack, outermost first."""
    frames = []
    for frame in stack.split(";"):
        function, _, where = frame.rpartition(" (")
        if function:
            frames.append((function, _short(where.rstrip(")"))))
    return frames


def _package(where: str) -> str:
    """The package a frame's file belongs to: ``json``, ``grpc``, ``altan.store``, ``services.tool.executor``..."""
    path = where.rpartition(":")[0]
    if path.startswith("<frozen "):
        return path.removeprefix("<frozen ").split(".")[0].rstrip(">")
    if path.startswith(("libs/", "services/")):
        return path.removeprefix("libs/").removesuffix(".py").replace("/", ".")
    return path.removeprefix("stdlib/").split("/")[0].removesuffix(".py")


def summarize(raw: Path, top: int) -> str:
    self_time: Counter[str] = Counter()
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count, frames = int(count_text), _frames(stack)
        if not frames:
            continue
        total += count
        function, where = frames[-1]
        self_time[f"{function} ({where})"] += count
        packages[_package(where)] += count
        for name in {f"{f} ({w})" for f, w in frames if w.startswith(("libs/altan/", "services/"))}:
            if not name.startswith(("<module>", "main (", "run_service (")):
                own[name] += count
        texts = [f"{f} ({w}" for f, w in frames]
        for area, needles in AREAS.items():
            if any(needle in text for text in texts for needle in needles):
                areas[area] += count
    if not total:
        return "  (no samples)"

    def block(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"  {title}:"]
        rows += [f"    {100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(top)]
        return rows

    lines = [f"  {total} samples"]
    lines += block("self (top of stack)", self_time)
    lines += block("self, by package (C extensions count as the Python frame that called them)", packages)
    lines += block("project functions, inclusive", own)
    lines += block("areas, inclusive (they overlap)", areas)
    return "\n".join(lines)


def find_py_spy() -> str | None:
    """py-spy on PATH or beside this Python, if installed."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return py_spy if Path(py_spy).exists() else None


def start_sampler(py_spy: str, pid: int, seconds: float, rate: int, output: Path) -> subprocess.Popen[bytes]:
    """One ``py-spy record`` of one process, writing collapsed stacks to ``output`` (read with :func:`summarize`)."""
    command = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate)]
    # --gil: only samples holding the GIL, so waiting in epoll or for the GIL is not counted as work.
    command += ["--format", "raw", "--full-filenames", "--nonblocking", "--gil", "--output", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_samplers(py_spy: str, processes: Processes, seconds: float, rate: int) -> dict[str, subprocess.Popen[bytes]]:
    """One ``py-spy record`` per service, each writing collapsed stacks into the work directory."""
    return {
        name: start_sampler(py_spy, pid, seconds, rate, processes.workdir / f"{name}.txt")
        for name, pid in processes.pids.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="custom", choices=("builtin", "custom", "task", "mcp"))
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to sample")
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    py_spy = find_py_spy()
    if py_spy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2

    processes = start_processes(mcp_server=args.path == "mcp")
    try:

        async def run() -> None:
            target = await prepare(processes)
            workers = [Worker(target) for _ in range(args.in_flight)]
            ops = [w.operation(args.path) for w in workers]
            await closed_loop(ops, max_ops=200, max_seconds=10)  # warm up before sampling
            samplers = start_samplers(py_spy, processes, args.seconds, args.rate)
            phase = await closed_loop(ops, max_ops=10**9, max_seconds=args.seconds + 1)
            await asyncio.gather(*(asyncio.to_thread(s.wait, 30) for s in samplers.values()))
            await asyncio.gather(*(w.aclose() for w in workers))
            print(f"{args.path} at {args.in_flight} in flight: {phase.throughput:,.0f}/s while sampled\n")

        asyncio.run(run())
        for name in SERVICES:
            raw = processes.workdir / f"{name}.txt"
            if name in processes.pids and raw.exists():
                print(f"{name}:\n{summarize(raw, args.top)}\n")
        print(f"raw collapsed stacks: {processes.workdir}/<service>.txt")
    finally:
        processes.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
