"""A stand-in MCP server for benchmarks: ``python bench/mcp_server.py PORT``.

Built with the official SDK (FastMCP) and served over streamable HTTP the way most servers are: stateful sessions,
answers as Server-Sent Events. One tool, ``lookup``, answers the fake API's record as structured content. It runs in
a process of its own so that its CPU is counted apart from the stack's: what the benchmark compares is the stack's
CPU per call, the server's being what any client of it pays as well.
"""

from __future__ import annotations

import argparse
import socket

import uvicorn
from mcp.server.fastmcp import FastMCP
from pydantic import BaseModel

TOOL = "lookup"


class Record(BaseModel):
    """What ``lookup`` answers: the fake API's record."""

    customer: str
    tier: str


def build() -> FastMCP:
    server = FastMCP("bench", stateless_http=False, json_response=False, log_level="CRITICAL")

    @server.tool(name=TOOL)
    def lookup(customer: str) -> Record:
        """Read a customer record."""
        return Record(customer=customer.capitalize(), tier="gold")

    return server


def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)  # connections wait in the backlog until uvicorn accepts them
    config = uvicorn.Config(build().streamable_http_app(), log_level="warning", lifespan="on", access_log=False)
    print(f"mcp server listening on 127.0.0.1:{port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    serve(parser.parse_args().port)
