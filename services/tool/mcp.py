"""MCP servers as tool providers: a tenant's servers, the tools they lend, and calls to them.

A server is registered (``sync``) by the integrator, which resolves its credential: the Tool Service connects with
the official ``mcp`` client over streamable HTTP, lists the tools, and stores the server with them in the tenant's
state, so every replica answers the same catalogue without connecting. Calls go through a session kept per tenant
and server (:mod:`services.tool.mcp_sessions`), bound to the credential value the integrator resolved: a call with
another value opens a new one.

Every HTTP request of the SDK goes through :class:`altan.outbound.GuardedTransport`: checked by the egress guard,
connected to the checked address, redirects refused, bodies capped at ``ALTAN_MAX_OUTPUT_BYTES``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from mcp import ClientSession, McpError
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent
from mcp.types import Tool as McpTool

from altan.api.convert import now_ms
from altan.api.mcp import McpServerSpec
from altan.api.tools import TOOL_ID_PATTERN, tool_to_proto
from altan.context import current, require_admin
from altan.errors import AltanError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from altan.outbound import GuardedTransport
from altan.store import TenantStore
from services.tool.executor import Credential, redact
from services.tool.mcp_sessions import McpSessions, SessionBroken, SessionUnopened
from services.tool.schema import check_input_schema

__all__ = ["MCP_SEPARATOR", "McpServers", "mcp_output", "mcp_tool_id"]

log = logging.getLogger(__name__)

_SERVERS = "mcp-servers"
MCP_SEPARATOR = "__"
_TOOL_ID = re.compile(TOOL_ID_PATTERN)
_NOT_ID = re.compile(r"[^a-z0-9_-]")
_MAX_TOOLS = 200  # per server: a tenant's agent sends every bound tool's schema to its LLM
_MAX_PAGES = 20
_MAX_DESCRIPTION = 10_000
_MAX_ERROR_TEXT = 1000


def mcp_tool_id(server: str, name: str) -> str:
    """``<server>__<tool>``: the MCP name lower-cased, anything but ``[a-z0-9_-]`` made ``_``."""
    return f"{server}{MCP_SEPARATOR}{_NOT_ID.sub('_', name.lower())}"


def mcp_output(result: CallToolResult) -> Any:
    """A tool's answer as the call's output: ``structuredContent`` when the server gave it; else the text of a lone
    text block; else the content blocks as MCP writes them."""
    if result.structuredContent is not None:
        return result.structuredContent
    if len(result.content) == 1 and isinstance(result.content[0], TextContent):
        return result.content[0].text
    return [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content]


def _error_text(result: CallToolResult) -> str:
    text = " ".join(b.text for b in result.content if isinstance(b, TextContent)).strip()
    return text[:_MAX_ERROR_TEXT] or "no message"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


class McpServers:
    """The current tenant's MCP servers and their tools."""

    def __init__(
        self,
        store: TenantStore,
        transport: Callable[[], GuardedTransport],
        *,
        default_timeout: float = 30.0,
    ) -> None:
        self._store = store
        self._transport = transport
        self._default_timeout = default_timeout
        # The SDK's debug lines quote every message whole: tenants' arguments and outputs, and whatever a server
        # echoes of the credential it was sent. Never below WARNING, whatever ALTAN_LOG_LEVEL says.
        sdk_log = logging.getLogger("mcp")
        sdk_log.setLevel(max(sdk_log.getEffectiveLevel(), logging.WARNING))
        self._sessions = McpSessions(transport, call_timeout=default_timeout)

    async def aclose(self) -> None:
        """Close the kept sessions (at shutdown)."""
        await self._sessions.aclose()

    # --- the resource -------------------------------------------------------------------------------------------

    async def sync(
        self, name: str, spec: McpServerSpec, credential: Credential | None, timeout: float | None
    ) -> tuple[dict[str, Any], bool]:
        """Connect, list the server's tools, and store it (replacing one of that name); ``(server, created)``."""
        require_admin("registering an MCP server")
        listed = await self._list_tools(name, spec.url, credential, timeout or self._default_timeout)
        tools = self._accept(name, spec, listed)
        previous = await self._store.get(_SERVERS, name)
        now = now_ms()
        server = {
            "name": name,
            "url": spec.url,
            "credential": spec.credential or "",
            "tools": tools,
            "created_at": now if previous is None else previous["created_at"],
            "updated_at": now,
        }
        await self._store.put(_SERVERS, name, server)
        self._sessions.drop(current().tenant_id, name)  # a replaced server's calls start afresh
        log.info("mcp server listed", extra={"server": name, "tools": sorted(tools)})
        return server, previous is None

    async def get(self, name: str) -> dict[str, Any]:
        server = await self._store.get(_SERVERS, name)
        if server is None:
            raise NotFound(f"MCP server '{name}' not found")
        return server

    async def all(self) -> list[dict[str, Any]]:
        return sorted((await self._store.all(_SERVERS)).values(), key=lambda s: s["name"])

    async def delete(self, name: str) -> None:
        require_admin("deleting an MCP server")
        if not await self._store.delete(_SERVERS, name):
            raise NotFound(f"MCP server '{name}' not found")
        self._sessions.drop(current().tenant_id, name)

    # --- the catalogue ------------------------------------------------------------------------------------------

    async def tools(self) -> list[dict[str, Any]]:
        """Every tool of the tenant's servers, by tool id."""
        found = [tool for server in await self.all() for tool in server["tools"].values()]
        return sorted(found, key=lambda t: t["tool_id"])

    async def tool(self, tool_id: str) -> dict[str, Any] | None:
        server_name, separator, _ = tool_id.partition(MCP_SEPARATOR)
        if not separator:
            return None
        server = await self._store.get(_SERVERS, server_name)
        return server["tools"].get(tool_id) if server is not None else None

    def _accept(self, server: str, spec: McpServerSpec, listed: list[McpTool]) -> dict[str, dict[str, Any]]:
        """The server's tools the catalogue can take; each refusal is logged with its reason."""
        accepted: dict[str, dict[str, Any]] = {}
        for definition in listed[:_MAX_TOOLS]:
            tool_id = mcp_tool_id(server, definition.name)
            try:
                if not _TOOL_ID.match(tool_id):
                    raise InvalidArgument(f"the tool id '{tool_id[:80]}' must match {TOOL_ID_PATTERN}")
                if tool_id in accepted:
                    raise InvalidArgument(f"another tool of the server has the id '{tool_id}'")
                # A server is the tenant's input like a custom tool's schema: held to the same bounds.
                schema = dict(definition.inputSchema)
                # Servers written against older drafts say so; the keywords they use read the same in 2020-12.
                schema.pop("$schema", None)
                schema = check_input_schema(schema, field="input_schema")
                tool = {
                    "tool_id": tool_id,
                    "type": "mcp",
                    "name": (definition.title or definition.name)[:200],
                    "description": (definition.description or "")[:_MAX_DESCRIPTION],
                    "input_schema": schema,
                    "credential": spec.credential or "",
                    "mcp_server": server,
                    "mcp_url": spec.url,
                    "mcp_tool": definition.name,
                }
                tool_to_proto(tool)  # what the catalogue will answer must convert (Struct depth, numbers)
            except (AltanError, ValueError) as exc:
                reason = exc.message if isinstance(exc, AltanError) else str(exc)
                log.warning("tool of an MCP server refused", extra={"server": server, "why": reason[:300]})
                continue
            tool["revision"] = hashlib.sha256(json.dumps(tool, sort_keys=True).encode()).hexdigest()[:16]
            accepted[tool_id] = tool
        return accepted

    # --- calls --------------------------------------------------------------------------------------------------

    async def invoke(
        self, tool: dict[str, Any], arguments: dict[str, Any], credential: Credential | None, timeout: float | None
    ) -> Any:
        """Call the MCP tool; its output (:func:`mcp_output`). An error result is FAILED_PRECONDITION with its text."""
        if tool.get("credential") and credential is None:
            raise FailedPrecondition(f"tool '{tool['tool_id']}' needs credential '{tool['credential']}'")
        budget = timeout or self._default_timeout
        result = await self._call(tool["mcp_server"], tool["mcp_url"], credential, budget, tool["mcp_tool"], arguments)
        secret = credential.value if credential is not None else ""
        if result.isError:
            text = _error_text(result)
            raise FailedPrecondition(f"tool '{tool['tool_id']}': {redact(text, secret) if secret else text}")
        output = mcp_output(result)
        return redact(output, secret) if secret else output

    async def _list_tools(self, server: str, url: str, credential: Credential | None, budget: float) -> list[McpTool]:
        listed: list[McpTool] = []
        async with self._session(server, url, credential, budget) as session:
            cursor: str | None = None
            for _ in range(_MAX_PAGES):
                page = await session.list_tools(cursor=cursor)
                listed.extend(page.tools)
                cursor = page.nextCursor
                if not cursor or len(listed) >= _MAX_TOOLS:
                    break
        return listed

    async def _call(
        self,
        server: str,
        url: str,
        credential: Credential | None,
        budget: float,
        name: str,
        arguments: dict[str, Any],
    ) -> CallToolResult:
        """``tools/call`` on the kept session, within ``budget``; once more on a new session if the kept one ended
        under the call (the server restarted, or forgot the session): the call never reached the tool then."""
        tenant = current().tenant_id
        headers = credential.as_headers() if credential is not None else None
        transport: GuardedTransport | None = None

        async def call_once() -> CallToolResult:
            nonlocal transport
            kept = await self._sessions.kept(tenant, server, url, headers)
            transport = kept.transport
            try:
                return await kept.call(lambda session: session.call_tool(name, arguments))
            except SessionBroken:
                self._sessions.drop(tenant, server, kept)
                raise

        try:
            async with asyncio.timeout(budget):
                try:
                    return await call_once()
                except SessionBroken:
                    return await call_once()
        except TimeoutError:
            # The late answer may still come on that session: closed once its calls are done, not shared further.
            self._sessions.drop(tenant, server)
            raise DeadlineExceeded(f"MCP server '{server}' did not answer within {budget:g}s") from None
        except SessionUnopened as exc:
            raise self._failure(server, exc.cause, exc.transport) from None
        except SessionBroken:
            raise Unavailable(f"MCP server '{server}' closed the session twice in a row") from None
        except (Exception, BaseExceptionGroup) as exc:
            raise self._failure(server, exc, transport) from None

    @asynccontextmanager
    async def _session(
        self, server: str, url: str, credential: Credential | None, budget: float
    ) -> AsyncIterator[ClientSession]:
        """An initialized session, every request through the egress guard, the whole block within ``budget``."""
        transport = self._transport()
        headers = credential.as_headers() if credential is not None else None
        timeout = httpx.Timeout(budget)
        try:
            async with asyncio.timeout(budget):
                async with (
                    httpx.AsyncClient(
                        transport=transport, headers=headers, timeout=timeout, follow_redirects=False, trust_env=False
                    ) as client,
                    streamable_http_client(url, http_client=client) as (read, write, _),
                    ClientSession(read, write) as session,
                ):
                    await session.initialize()
                    yield session
        except TimeoutError:
            raise DeadlineExceeded(f"MCP server '{server}' did not answer within {budget:g}s") from None
        except (Exception, BaseExceptionGroup) as exc:
            raise self._failure(server, exc, transport) from None

    @staticmethod
    def _failure(server: str, exc: BaseException, transport: GuardedTransport | None) -> AltanError:
        """One clear error for what the SDK raised (often an exception group of its task group)."""
        if transport is not None and transport.refusal is not None:
            return transport.refusal
        leaves = _leaves(exc)
        for leaf in leaves:
            if isinstance(leaf, AltanError):
                return leaf
        for leaf in leaves:
            if isinstance(leaf, httpx.HTTPStatusError):
                status = leaf.response.status_code
                if status in (401, 403):
                    return FailedPrecondition(f"MCP server '{server}' refused the credential (HTTP {status})")
                if status >= 500 or status == 429:
                    return Unavailable(f"MCP server '{server}' is unavailable (HTTP {status})")
                return FailedPrecondition(f"MCP server '{server}' answered HTTP {status}")
            if isinstance(leaf, httpx.InvalidURL | httpx.UnsupportedProtocol):
                return InvalidArgument(f"url: MCP server '{server}' cannot be reached at that URL")
            if isinstance(leaf, httpx.TransportError):
                return Unavailable(f"MCP server '{server}' is unavailable ({type(leaf).__name__})")
            if isinstance(leaf, McpError):
                return FailedPrecondition(f"MCP server '{server}' answered an error: {leaf.error.message[:300]}")
        # Not UNAVAILABLE: that one is retried, and what failed here is not known to be passing.
        log.warning("MCP session failed", extra={"server": server, "error": type(leaves[0]).__name__})
        return FailedPrecondition(f"MCP server '{server}' failed ({type(leaves[0]).__name__})")
