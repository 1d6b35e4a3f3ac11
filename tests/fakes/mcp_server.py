"""A reference MCP server, built with the official SDK (FastMCP), served over streamable HTTP on a real socket.

Tools: ``add`` (structured output), ``echo`` (plain text), ``fail`` (always an error result), ``whoami`` (the
request's auth header, as the server saw it: the tests prove a credential arrived, and that it does not come back
unredacted), ``remember`` (the idempotency keys of its calls, from their ``_meta``), ``sessions`` (how many sessions
clients have opened: initialize requests, counted by :class:`_CountSessions`), ``slow`` (answers after the seconds
asked), ``camelCase.Tool`` (a name that is not a tool id as it stands), and ``grow`` / ``shrink``, which add or remove
a tool of the given name at runtime and then send ``notifications/tools/list_changed`` to every session that has
listed the tools (unless ``notify`` is false, as a server that forgets to would).

With ``--hostile`` it also lists what a hostile server would: 300 more tools (``bulk_<n>``), and ``evil_output``,
whose ``outputSchema`` holds a pattern that backtracks for minutes on the structured content it answers (a client
that checks answers against a server's output schema is stuck there). With ``--token T``
every request must carry ``Authorization: Bearer T`` (401 otherwise), as a server behind an API key would.

python -m tests.fakes.mcp_server --port 8765 [--token T]   prints "mcp server ready on <port>" once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import selectors
import socket
import subprocess
import sys
import time
from typing import Any

import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.session import ServerSession
from mcp.types import CallToolResult, TextContent
from mcp.types import Tool as McpTool
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["build_server", "main", "start_process", "stop_process"]


class Sum(BaseModel):
    """The answer of ``add``."""

    total: int
    terms: list[int]


EVIL_PATTERN = "^(a+)+$"  # backtracks exponentially on "aaa...a!"


class _Reference(FastMCP):
    """FastMCP that remembers every session that listed its tools, to tell them when the list changes."""

    def __init__(self, hostile: bool = False) -> None:
        # The SDK logs a closed stream at every session end.
        super().__init__("reference", stateless_http=False, json_response=False, log_level="CRITICAL")
        self.listeners: list[ServerSession] = []
        self.hostile = hostile

    async def list_tools(self) -> list[McpTool]:
        session = self._mcp_server.request_context.session
        if session not in self.listeners:
            self.listeners.append(session)
        tools = await super().list_tools()
        if not self.hostile:
            return tools
        evil = {"type": "object", "properties": {"s": {"type": "string", "pattern": EVIL_PATTERN}}}
        tools = [t.model_copy(update={"outputSchema": evil}) if t.name == "evil_output" else t for t in tools]
        bulk = [
            McpTool(name=f"bulk_{n}", description="One of many.", inputSchema={"type": "object"}) for n in range(300)
        ]
        return tools + bulk

    async def tools_changed(self) -> int:
        """``notifications/tools/list_changed`` to every session that listed the tools; how many it reached."""
        reached = 0
        for session in list(self.listeners):
            try:
                await session.send_tool_list_changed()
                reached += 1
            except Exception:  # that session has ended
                self.listeners.remove(session)
        return reached


def build_server(opened: list[int] | None = None, *, hostile: bool = False) -> FastMCP:
    opened = opened if opened is not None else [0]
    server = _Reference(hostile)

    @server.tool()
    def add(a: int, b: int) -> Sum:
        """Add two integers."""
        return Sum(total=a + b, terms=[a, b])

    @server.tool()
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    @server.tool()
    def fail(reason: str = "no reason") -> str:
        """Always fails."""
        raise ValueError(f"failed on purpose: {reason}")

    @server.tool()
    def whoami(ctx: Context[Any, Any, Any]) -> dict[str, str]:
        """The Authorization header this server received."""
        request = ctx.request_context.request
        header = request.headers.get("authorization", "") if request is not None else ""
        return {"authorization": header}

    @server.tool()
    def sessions() -> int:
        """How many sessions clients have opened on this server."""
        return opened[0]

    @server.tool()
    async def slow(seconds: float) -> float:
        """Answers after that many seconds."""
        await asyncio.sleep(seconds)
        return seconds

    noted: dict[str, list[str]] = {}

    @server.tool()
    async def remember(name: str, ctx: Context[Any, Any, Any], seconds: float = 0, note: bool = True) -> list[str]:
        """Notes the call's idempotency key (its _meta's io.altan/idempotency-key) under ``name`` (unless ``note`` is
        false), waits ``seconds``, and answers every key noted under ``name``."""
        if note:
            meta = ctx.request_context.meta
            extra = (meta.model_extra or {}) if meta is not None else {}
            noted.setdefault(name, []).append(str(extra.get("io.altan/idempotency-key", "")))
        await asyncio.sleep(seconds)
        return noted.get(name, [])

    @server.tool(name="camelCase.Tool")
    def camel(x: int = 1) -> int:
        """A tool whose name is not a tool id as it stands."""
        return x * 2

    if hostile:

        @server.tool()
        def evil_output() -> CallToolResult:
            """Answers what its output schema's pattern chokes on (answered as is: the server does not check it)."""
            text = "a" * 40 + "!"
            return CallToolResult(content=[TextContent(type="text", text=text)], structuredContent={"s": text})

    @server.tool()
    async def grow(name: str, notify: bool = True) -> int:
        """Add a tool of that name (it answers its own name); the number of sessions told."""

        def grown(text: str = "") -> str:
            return f"{name} {text}".strip()

        server.add_tool(grown, name=name, description=f"Added at runtime: {name}.")
        return await server.tools_changed() if notify else 0

    @server.tool()
    async def shrink(name: str, notify: bool = True) -> int:
        """Remove the tool of that name; the number of sessions told."""
        server.remove_tool(name)
        return await server.tools_changed() if notify else 0

    return server


class _CountSessions:
    """Counts the requests that open a session: a POST without ``mcp-session-id`` is an initialize."""

    def __init__(self, app: ASGIApp, opened: list[int]) -> None:
        self._app = app
        self._opened = opened

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and b"mcp-session-id" not in dict(scope["headers"]):
            self._opened[0] += 1
        await self._app(scope, receive, send)


class _RequireToken:
    """401 for a request without ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self._expected:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"unauthorized"})
            return
        await self._app(scope, receive, send)


def start_process(
    *, token: str = "", port: int = 0, hostile: bool = False, deadline: float = 20.0
) -> tuple[subprocess.Popen[str], int]:
    """The server as a process of its own; returns once it listens (its "ready" line), with its port."""
    command = [sys.executable, "-m", "tests.fakes.mcp_server", "--port", str(port)]
    if token:
        command += ["--token", token]
    if hostile:
        command += ["--hostile"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        end = time.monotonic() + deadline
        while (left := end - time.monotonic()) > 0:
            if selector.select(left):
                line = process.stdout.readline()
                if line.startswith("mcp server ready on "):
                    return process, int(line.rsplit(" ", 1)[1])
                if not line:
                    break  # it exited
    process.kill()
    raise RuntimeError("the reference MCP server did not start")


def stop_process(process: subprocess.Popen[str]) -> None:
    """Stop a server of :func:`start_process` and close its pipe."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    if process.stdout is not None:
        process.stdout.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="")
    parser.add_argument("--hostile", action="store_true")
    args = parser.parse_args(argv)
    opened = [0]
    app: ASGIApp = _CountSessions(build_server(opened, hostile=args.hostile).streamable_http_app(), opened)
    if args.token:
        app = _RequireToken(app, args.token)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts: "ready" is true once printed
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    print(f"mcp server ready on {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
