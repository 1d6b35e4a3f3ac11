"""The Tool Service's MCP call path alone, in-process: ``python bench/mcp_calls.py [--calls N] [--in-flight K]``.

Starts ``bench/mcp_server.py`` in a process of its own, registers it with :class:`services.tool.mcp.McpServers` (the
egress guard, the kept session, the official client), and calls its ``lookup`` tool N times, K at a time. Prints
the CPU this process spent per call (``time.process_time``: no gRPC, no gateway, no integrator, and not the
server's CPU) and how many TCP connections it opened per call. Less sensitive to a busy machine than
``bench/run.py``'s whole-stack figures, so a change to the MCP path can be compared in one sitting: run it with
``PYTHONPATH=<other checkout>/libs:<other checkout>`` for the other side.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from altan import context, outbound
from altan.api.mcp import McpServerSpec
from altan.context import RequestContext
from altan.egress import EgressGuard, EgressPolicy
from altan.outbound import GuardedHttpClient
from altan.store import MemoryBackend, TenantStore
from services.tool.mcp import McpServers

SERVER = Path(__file__).resolve().parent / "mcp_server.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _count_connections() -> list[int]:
    """Counts the TCP connections the pinned backend opens (one list cell, incremented)."""
    opened = [0]
    connect = outbound._PinnedBackend.connect_tcp

    async def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        opened[0] += 1
        return await connect(self, *args, **kwargs)

    outbound._PinnedBackend.connect_tcp = counting  # type: ignore[method-assign]
    return opened


def start_server() -> tuple[subprocess.Popen[str], int]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(SERVER), str(port)], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    server.stdout.readline()  # "listening": it accepts from here on
    return server, port


async def run(port: int, calls: int, in_flight: int) -> str:
    opened = _count_connections()
    http = GuardedHttpClient(EgressGuard(EgressPolicy.parse(f"127.0.0.1:{port}")))
    mcp = McpServers(TenantStore(MemoryBackend(), "tool"), http.transport, default_timeout=30)
    try:
        context.bind(RequestContext(tenant_id="bench", user="bench", role="admin", token=""))
        await mcp.sync("bench", McpServerSpec(url=f"http://127.0.0.1:{port}/mcp"), None, None)
        tool = await mcp.tool("bench__lookup")
        assert tool is not None

        async def worker(count: int) -> None:
            for _ in range(count):
                assert await mcp.invoke(tool, {"customer": "ada"}, None, None) == {"customer": "Ada", "tier": "gold"}

        await asyncio.gather(*(worker(20) for _ in range(in_flight)))  # warm-up
        before, cpu, wall = opened[0], time.process_time(), time.monotonic()
        await asyncio.gather(*(worker(calls // in_flight) for _ in range(in_flight)))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        done = calls // in_flight * in_flight
        return (
            f"{done} calls at {in_flight} in flight: {cpu / done * 1000:.2f} ms of CPU per call, "
            f"{(opened[0] - before) / done:.2f} TCP connections opened per call, {done / wall:,.0f} calls/s"
        )
    finally:
        await mcp.aclose()
        await http.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()
    server, port = start_server()
    try:
        print(asyncio.run(run(port, args.calls, args.in_flight)))
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
