"""The paths measured, each as one async operation that raises unless the answer is the expected one.

``baseline``: the benchmark process calls the fake API itself with httpx (what a tool call costs at the least).
``builtin``: ``json_extract`` invoked through REST → gateway → integrator → tool and back.
``custom``: a custom HTTP tool with an API-key credential (the README's ``crm_lookup``), which adds the
credential lookup, the egress guard and the outbound call to the fake API.
``cached``: the same custom tool with ``cacheable_seconds``, answered from the tenant's cache (the warm-up fills it).
``task``: the README's 3-step structured plan, submitted and followed on its Server-Sent Events to the end.
``mcp``: the MCP server's ``lookup`` tool (``bench/mcp_server.py``), registered as ``bench``, invoked through REST.
``mcp-direct``: the same tool called by the benchmark process with the official ``mcp`` client, a session per call
(initialize, the call, close: what the stack did per call before it kept sessions).
``mcp-reused``: the same, one session per in-flight slot kept for the whole run (what a client can do at the least).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from bench.harness import Processes

__all__ = ["PLAN", "Target", "UnexpectedAnswer", "Worker", "prepare"]

Operation = Callable[[], Awaitable[None]]

RECORD = {"customer": "Ada", "tier": "gold"}
EMAIL = "From: Ada <ada@example.com>\nSubject: Where is my order?\n\nHi!"
PLAN: list[dict[str, Any]] = [
    {"id": "s1", "tool": "parse_email", "arguments": {"raw": EMAIL}},
    {"id": "s2", "tool": "crm_lookup", "arguments": {"customer": "ada"}},
    {
        "id": "s3",
        "tool": "text_template",
        "depends_on": ["s1", "s2"],
        "arguments": {
            "template": 'Dear {{ name }} ({{ tier }}), about "{{ subject }}": we are on it.',
            "values": {"name": "${s2.output.customer}", "tier": "${s2.output.tier}", "subject": "${s1.output.subject}"},
        },
    },
]
_TERMINAL = ("event: task.succeeded", "event: task.failed", "event: task.cancelled")


class UnexpectedAnswer(RuntimeError):
    """A benchmarked call did not answer what it should: the numbers would mean nothing."""


def _check(response: httpx.Response, status: int) -> Any:
    if response.status_code != status:
        request = response.request
        raise UnexpectedAnswer(f"{request.method} {request.url}: {response.status_code} {response.text[:500]}")
    return response.json()


@dataclass(frozen=True)
class Target:
    """What the operations talk to: set up once per run."""

    base_url: str
    token: str
    fake_url: str
    agent_id: str
    mcp_url: str = ""  # empty when the run has no MCP server


class Worker:
    """One in-flight slot of the load: its own clients, so one keep-alive connection per target.

    httpx's pool costs the caller more CPU per request the more requests share it (at 32 in flight through one
    client, the load generator's CPU per request doubled and it became the bottleneck); one client per worker
    keeps the load generator's cost flat, for the baseline and the stack alike.
    """

    def __init__(self, target: Target) -> None:
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        self.target = target
        self.api = httpx.AsyncClient(
            base_url=target.base_url,
            headers={"Authorization": f"Bearer {target.token}"},
            limits=limits,
            timeout=30,
            trust_env=False,
        )
        self.direct = httpx.AsyncClient(limits=limits, timeout=30, trust_env=False)
        self._kept: _KeptSession | None = None

    async def baseline(self) -> None:
        url = f"{self.target.fake_url}/v1/ada.json"
        answer = _check(await self.direct.get(url, headers={"X-Api-Key": "sk-test-123"}), 200)
        if answer != RECORD:
            raise UnexpectedAnswer(f"fake api answered {answer}")

    async def builtin(self) -> None:
        body = {"arguments": {"data": {"customer": RECORD}, "path": "customer.tier"}}
        answer = _check(await self.api.post("/v1/tools/json_extract/invoke", json=body), 200)
        if answer["output"] != {"value": "gold", "found": True}:
            raise UnexpectedAnswer(f"json_extract answered {answer}")

    async def custom(self) -> None:
        body = {"arguments": {"customer": "ada"}}
        answer = _check(await self.api.post("/v1/tools/crm_lookup/invoke", json=body), 200)
        if answer != {"output": RECORD, "status": 200}:
            raise UnexpectedAnswer(f"crm_lookup answered {answer}")

    async def cached(self) -> None:
        body = {"arguments": {"customer": "ada"}}
        answer = _check(await self.api.post("/v1/tools/crm_cached/invoke", json=body), 200)
        if answer["output"] != RECORD:
            raise UnexpectedAnswer(f"crm_cached answered {answer}")

    async def task(self) -> None:
        url = f"/v1/agents/{self.target.agent_id}/tasks"
        submitted = _check(await self.api.post(url, json={"input": {"plan": PLAN}}), 202)
        terminal = ""
        async with self.api.stream("GET", f"/v1/tasks/{submitted['task_id']}/events") as stream:
            if stream.status_code != 200:
                raise UnexpectedAnswer(f"events: {stream.status_code}")
            async for line in stream.aiter_lines():  # read to the end: the server closes after the last event
                if line.startswith(_TERMINAL):
                    terminal = line
        if terminal != "event: task.succeeded":
            raise UnexpectedAnswer(f"task {submitted['task_id']} ended with {terminal or 'no terminal event'}")

    async def mcp(self) -> None:
        body = {"arguments": {"customer": "ada"}}
        answer = _check(await self.api.post(f"/v1/tools/bench__{MCP_TOOL}/invoke", json=body), 200)
        if answer != {"output": RECORD}:
            raise UnexpectedAnswer(f"bench__{MCP_TOOL} answered {answer}")

    async def mcp_direct(self) -> None:
        async with (
            streamable_http_client(self.target.mcp_url, http_client=self.direct) as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            _check_mcp(await session.call_tool(MCP_TOOL, {"customer": "ada"}))

    async def mcp_reused(self) -> None:
        if self._kept is None:
            self._kept = _KeptSession(self.target.mcp_url, self.direct)
        session = await self._kept.session()
        _check_mcp(await session.call_tool(MCP_TOOL, {"customer": "ada"}))

    def operation(self, path: str) -> Operation:
        operations: dict[str, Operation] = {
            "baseline": self.baseline,
            "builtin": self.builtin,
            "custom": self.custom,
            "cached": self.cached,
            "task": self.task,
            "mcp": self.mcp,
            "mcp-direct": self.mcp_direct,
            "mcp-reused": self.mcp_reused,
        }
        return operations[path]

    async def aclose(self) -> None:
        if self._kept is not None:
            await self._kept.aclose()
        await self.api.aclose()
        await self.direct.aclose()


MCP_TOOL = "lookup"


def _check_mcp(result: CallToolResult) -> None:
    if result.isError or result.structuredContent != RECORD:
        raise UnexpectedAnswer(f"{MCP_TOOL} answered {result.model_dump(exclude_none=True)}")


class _KeptSession:
    """One MCP session held open by a task of its own: the SDK's task groups must be left by the task that entered
    them, and the benchmark's phases call from tasks of their own."""

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self._ready: asyncio.Future[ClientSession] = asyncio.get_running_loop().create_future()
        self._done = asyncio.Event()
        self._task = asyncio.create_task(self._hold(url, client))

    async def _hold(self, url: str, client: httpx.AsyncClient) -> None:
        try:
            async with (
                streamable_http_client(url, http_client=client) as (read, write, _),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                self._ready.set_result(session)
                await self._done.wait()
        except Exception as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    async def session(self) -> ClientSession:
        return await asyncio.wait_for(asyncio.shield(self._ready), 30)

    async def aclose(self) -> None:
        self._done.set()
        await asyncio.wait_for(self._task, 30)


async def prepare(processes: Processes, *, limits: bool = False) -> Target:
    """A fresh tenant with the README's credential, custom tool and agent, and the MCP server when there is one."""
    token = processes.token(f"bench-{uuid.uuid4().hex[:8]}")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=processes.base_url, headers=headers, timeout=30, trust_env=False) as api:
        credential = {"type": "api_key", "value": "sk-test-123", "header": "X-Api-Key", "prefix": ""}
        _check(await api.put("/v1/credentials/crm", json=credential), 201)
        tool = {
            "tool_id": "crm_lookup",
            "name": "CRM lookup",
            "description": "Reads a customer record",
            "parameters": [{"name": "customer", "type": "string", "required": True}],
            "endpoint": f"{processes.fake_url}/v1/{{customer}}.json",
            "method": "GET",
            "auth": "api_key",
            "credential": "crm",
        }
        if limits:  # a rate limit that never binds, so that every call takes its token
            tool["rate_limit"] = {"requests": 1_000_000, "per_seconds": 1}
        _check(await api.post("/v1/tools", json=tool), 201)
        cached = tool | {"tool_id": "crm_cached", "cacheable_seconds": 3600}
        _check(await api.post("/v1/tools", json=cached), 201)
        tools = ["crm_lookup", "parse_email", "text_template"]
        agent = {"name": "support", "instructions": "Answer customers.", "tools": tools}
        agent_id = _check(await api.post("/v1/agents", json=agent), 201)["id"]
        if processes.mcp is not None:
            _check(await api.put("/v1/mcp-servers/bench", json={"url": processes.mcp_url}), 201)
    mcp_url = processes.mcp_url if processes.mcp is not None else ""
    return Target(processes.base_url, token, processes.fake_url, agent_id, mcp_url)
