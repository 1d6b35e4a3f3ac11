"""MCP servers as tool providers: a tenant's servers, the tools they lend, and calls to them.

A server is registered (``sync``) by the integrator, which resolves its credential: the Tool Service opens a session
with the official ``mcp`` client over streamable HTTP, lists the tools, and stores the server with them in the
tenant's state, so every replica answers the same catalogue without connecting. Calls go through that session, kept
per tenant and server (:mod:`services.tool.mcp_sessions`) and bound to the credential value the integrator resolved:
a call with another value opens a new one.

While a session is kept, the server's list is followed: ``notifications/tools/list_changed`` on it, a session newly
opened by a call, and every ``relist_seconds`` as a safety net, each re-list the tools on that session and store
what changed (tools that are gone leave the catalogue).

Every HTTP request of the SDK goes through :class:`altan.outbound.GuardedTransport`: checked by the egress guard,
connected to the checked address, redirects refused, bodies capped at ``ALTAN_MAX_OUTPUT_BYTES``.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx
from mcp import ClientSession, McpError
from mcp.client.session import MessageHandlerFnT
from mcp.shared.session import RequestResponder
from mcp.types import (
    CallToolRequest,
    CallToolRequestParams,
    CallToolResult,
    ClientRequest,
    RequestParams,
    ServerNotification,
    TextContent,
    ToolListChangedNotification,
)
from mcp.types import Tool as McpTool

from altan.api.convert import now_ms
from altan.api.mcp import McpServerSpec
from altan.api.tools import TOOL_ID_PATTERN, tool_to_proto
from altan.context import RequestContext, bind, current, require_admin
from altan.errors import AltanError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from altan.outbound import GuardedTransport
from altan.store import TenantStore
from services.tool.executor import Credential, redact
from services.tool.mcp_sessions import KeptSession, McpSessions, SessionBroken, SessionUnopened
from services.tool.schema import check_input_schema

__all__ = ["IDEMPOTENCY_META", "MCP_SEPARATOR", "McpServers", "mcp_output", "mcp_tool_id"]

log = logging.getLogger(__name__)

_SERVERS = "mcp-servers"
MCP_SEPARATOR = "__"
# The key of a tools/call request's _meta that carries a task step's idempotency key (a reverse-DNS prefix, as the
# MCP specification asks of implementation-specific _meta keys).
IDEMPOTENCY_META = "io.altan/idempotency-key"
_TOOL_ID = re.compile(TOOL_ID_PATTERN)
_NOT_ID = re.compile(r"[^a-z0-9_-]")
_MAX_TOOLS = 200  # per server: a tenant's agent sends every bound tool's schema to its LLM
_MAX_PAGES = 20
_MAX_DESCRIPTION = 10_000
_MAX_ERROR_TEXT = 1000
# A server that says its list changed in a loop is re-listed at most this often (each listing checks every schema).
_MIN_RELIST_SECONDS = 1.0
_OPTION_FIELDS = ("rate_limit", "requires_approval", "cacheable_seconds", "fallback_tool_id", "timeout_seconds")
T = TypeVar("T")


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


async def _list_all(session: ClientSession) -> list[McpTool]:
    """Every tool the server lists (following its pages), up to the catalogue's bounds."""
    listed: list[McpTool] = []
    cursor: str | None = None
    for _ in range(_MAX_PAGES):
        page = await session.list_tools(cursor=cursor)
        listed.extend(page.tools)
        cursor = page.nextCursor
        if not cursor or len(listed) >= _MAX_TOOLS:
            break
    return listed


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
        relist_seconds: float = 300.0,
    ) -> None:
        self._store = store
        self._transport = transport
        self._default_timeout = default_timeout
        self._relist_seconds = relist_seconds
        # The SDK's debug lines quote every message whole: tenants' arguments and outputs, and whatever a server
        # echoes of the credential it was sent. Never below WARNING, whatever ALTAN_LOG_LEVEL says.
        sdk_log = logging.getLogger("mcp")
        sdk_log.setLevel(max(sdk_log.getEffectiveLevel(), logging.WARNING))
        self._sessions = McpSessions(transport, call_timeout=default_timeout, message_handler=self._listener)
        self._relisting: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._relist_again: set[tuple[str, str]] = set()
        self._listed_at: dict[KeptSession, float] = {}
        self._safety_net: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        """Stop following the servers' lists and close the kept sessions (at shutdown)."""
        tasks = [*self._relisting.values(), *([self._safety_net] if self._safety_net else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._sessions.aclose()

    # --- the resource -------------------------------------------------------------------------------------------

    async def sync(
        self, name: str, spec: McpServerSpec, credential: Credential | None, timeout: float | None
    ) -> tuple[dict[str, Any], bool]:
        """Connect, list the server's tools, and store it (replacing one of that name); ``(server, created)``."""
        require_admin("registering an MCP server")
        tenant = current().tenant_id
        self._sessions.drop(tenant, name)  # a replaced server's calls start afresh
        headers = credential.as_headers() if credential is not None else None
        budget = timeout or self._default_timeout
        # Listed on a session that is then kept: the next call saves the opening, and the server's
        # notifications/tools/list_changed reach this replica on it.
        kept, listed = await self._on_session(tenant, name, spec.url, headers, budget, _list_all)
        options = {tool: o.stored() for tool, o in spec.tool_options.items()}
        tools = self._accept(name, spec.url, spec.credential or "", options, listed)
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
        if options:
            server["tool_options"] = options
        await self._store.put(_SERVERS, name, server)
        self._listed_at[kept] = time.monotonic()
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

    def _accept(
        self,
        server: str,
        url: str,
        credential: str,
        options: Mapping[str, dict[str, Any]],
        listed: list[McpTool],
    ) -> dict[str, dict[str, Any]]:
        """The server's tools the catalogue can take, each with the tenant's options for it; each refusal is logged
        with its reason."""
        accepted: dict[str, dict[str, Any]] = {}
        for definition in listed[:_MAX_TOOLS]:
            tool_id = mcp_tool_id(server, definition.name)
            try:
                if not _TOOL_ID.match(tool_id):
                    raise InvalidArgument(f"the tool id '{tool_id[:80]}' must match {TOOL_ID_PATTERN}")
                if tool_id in accepted:
                    raise InvalidArgument(f"another tool of the server has the id '{tool_id}'")
                tool_options = options.get(definition.name, {})
                if tool_options.get("fallback_tool_id") == tool_id:
                    raise InvalidArgument("fallback_tool_id: a tool cannot be its own fallback")
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
                    "credential": credential,
                    "mcp_server": server,
                    "mcp_url": url,
                    "mcp_tool": definition.name,
                    **{k: v for k, v in tool_options.items() if k in _OPTION_FIELDS},
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
        self,
        tool: dict[str, Any],
        arguments: dict[str, Any],
        credential: Credential | None,
        timeout: float | None,
        idempotency_key: str = "",
    ) -> Any:
        """Call the MCP tool; its output (:func:`mcp_output`). An error result is FAILED_PRECONDITION with its text.

        A task step's ``idempotency_key`` goes in the request's ``_meta`` as ``io.altan/idempotency-key``: MCP has
        no per-call headers on every transport, and the session (with its headers) is shared by many calls."""
        if tool.get("credential") and credential is None:
            raise FailedPrecondition(f"tool '{tool['tool_id']}' needs credential '{tool['credential']}'")
        budget = timeout or self._default_timeout
        if tool.get("timeout_seconds"):
            budget = min(budget, tool["timeout_seconds"])  # the tenant's option, within the call's deadline
        tenant = current().tenant_id
        headers = credential.as_headers() if credential is not None else None
        meta = RequestParams.Meta(**{IDEMPOTENCY_META: idempotency_key}) if idempotency_key else None
        request = ClientRequest(
            CallToolRequest(params=CallToolRequestParams(name=tool["mcp_tool"], arguments=arguments, _meta=meta))
        )
        kept, result = await self._on_session(
            tenant,
            tool["mcp_server"],
            tool["mcp_url"],
            headers,
            budget,
            # Not ClientSession.call_tool: it checks structuredContent against the tool's outputSchema with
            # jsonschema.validate, which checks and compiles the server's schema again on every call (a tenant's
            # input evaluated without bounds, in this shared process; 12 % of the service's CPU per call), and
            # lists the tools again for a name it has not seen on that session. The output is the server's word
            # either way, bounded in size.
            lambda session: session.send_request(request, CallToolResult),
        )
        if kept not in self._listed_at:
            # A session this replica opened for a call (after a restart, a rotated credential, a broken session):
            # the list may have changed while no session was kept to hear it.
            self._listed_at[kept] = 0.0
            self._relist_soon(tenant, tool["mcp_server"])
        secret = credential.value if credential is not None else ""
        if result.isError:
            text = _error_text(result)
            raise FailedPrecondition(f"tool '{tool['tool_id']}': {redact(text, secret) if secret else text}")
        output = mcp_output(result)
        return redact(output, secret) if secret else output

    async def _on_session(
        self,
        tenant: str,
        server: str,
        url: str,
        headers: Mapping[str, str] | None,
        budget: float,
        operation: Callable[[ClientSession], Awaitable[T]],
    ) -> tuple[KeptSession, T]:
        """``operation`` on the kept session, within ``budget``; once more on a new session if the kept one ended
        under it (the server restarted, or forgot the session): the request never reached the tool then."""
        transport: GuardedTransport | None = None

        async def once() -> tuple[KeptSession, T]:
            nonlocal transport
            kept = await self._sessions.kept(tenant, server, url, headers)
            transport = kept.transport
            try:
                return kept, await kept.call(operation)
            except SessionBroken:
                self._sessions.drop(tenant, server, kept)
                raise

        try:
            async with asyncio.timeout(budget):
                try:
                    return await once()
                except SessionBroken:
                    return await once()
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

    # --- following the servers' lists ---------------------------------------------------------------------------

    def _listener(self, tenant: str, server: str) -> MessageHandlerFnT:
        """What a kept session does with what its server sends on its own: a changed tool list is listed again."""
        if self._safety_net is None:  # started by the first session, in a context of its own (no caller's token)
            self._safety_net = asyncio.create_task(
                self._relist_periodically(), name="mcp-relist", context=contextvars.Context()
            )

        async def handle(
            message: RequestResponder[Any, Any] | ServerNotification | Exception,
        ) -> None:
            if isinstance(message, ServerNotification) and isinstance(message.root, ToolListChangedNotification):
                self._relist_soon(tenant, server)

        return handle

    def _relist_soon(self, tenant: str, server: str) -> None:
        """Re-list the server's tools in the background, as that tenant (never in the session's own reader: the
        listing's answer arrives through it). One listing at a time per server; a change heard during one is
        listed again after it."""
        key = (tenant, server)
        running = self._relisting.get(key)
        if running is not None and not running.done():
            self._relist_again.add(key)
            return
        # A context of its own: the tenant alone, not the token or task of whichever request opened the session.
        scope = contextvars.Context()
        scope.run(bind, RequestContext(tenant_id=tenant, user="", role="member", token=""))
        task = asyncio.create_task(self._relist(tenant, server), name=f"mcp-relist {server}", context=scope)
        self._relisting[key] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._relisting.get(key) is done:
                del self._relisting[key]

        task.add_done_callback(forget)

    async def _relist(self, tenant: str, name: str) -> None:
        key = (tenant, name)
        while True:
            self._relist_again.discard(key)
            kept = self._sessions.live(tenant, name)
            if kept is None:
                return
            try:
                async with asyncio.timeout(self._default_timeout):
                    listed = await kept.call(_list_all)
            except SessionBroken:
                self._sessions.drop(tenant, name, kept)
                return
            except (Exception, BaseExceptionGroup) as exc:
                failure = self._failure(name, exc, kept.transport) if not isinstance(exc, TimeoutError) else exc
                log.warning("MCP server could not be listed again", extra={"server": name, "error": str(failure)[:300]})
                return
            self._listed_at[kept] = time.monotonic()
            await self._store_listing(name, kept, listed)
            if key not in self._relist_again:
                return
            await asyncio.sleep(_MIN_RELIST_SECONDS)

    async def _store_listing(self, name: str, kept: KeptSession, listed: list[McpTool]) -> None:
        """The server's new list, stored if it changed and if the server is still the one the session was opened
        for (not deleted or replaced meanwhile)."""
        server = await self._store.get(_SERVERS, name)
        if server is None or server["url"] != kept.url or not kept.alive:
            return
        tools = self._accept(name, server["url"], server["credential"], server.get("tool_options") or {}, listed)
        if tools == server["tools"]:
            return
        gone, new = sorted(set(server["tools"]) - set(tools)), sorted(set(tools) - set(server["tools"]))
        await self._store.put(_SERVERS, name, {**server, "tools": tools, "updated_at": now_ms()})
        log.info("mcp server listed again", extra={"server": name, "added": new, "removed": gone})

    async def _relist_periodically(self) -> None:
        """The safety net for servers that change without saying so: every kept session not listed within
        ``relist_seconds`` is listed again."""
        while True:
            await asyncio.sleep(self._relist_seconds / 4)
            now = time.monotonic()
            for kept in list(self._listed_at):
                if not kept.alive:
                    del self._listed_at[kept]
            for (tenant, server), kept in self._sessions.items():
                if now - self._listed_at.get(kept, 0.0) >= self._relist_seconds:
                    self._listed_at[kept] = now
                    self._relist_soon(tenant, server)

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
