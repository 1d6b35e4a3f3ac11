"""The tenant's tool registry: built-in tools and container tools for everyone, custom tools per tenant.

A tool id names one tool in a tenant. Built-ins come first and cannot be taken. A custom tool may not take the id of
a container tool (409); a custom tool created before a container offered its id keeps it in its tenant, where the
container's tool is hidden (a deployment must not change what a tenant's agents call).
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

from altan.api.convert import now_ms
from altan.api.tools import CustomToolSpec
from altan.context import require_admin
from altan.errors import AlreadyExists, NotFound, PermissionDenied
from altan.store import TenantStore
from services.tool.builtins import BUILTIN_TOOLS
from services.tool.schema import check_custom_tool

__all__ = ["SharedTools", "TenantTools", "ToolRegistry"]

_TOOLS = "tools"


class SharedTools(Protocol):
    """Tools every tenant of the install has besides the built-ins (the tool containers')."""

    def get(self, tool_id: str) -> dict[str, Any] | None: ...

    def all(self) -> list[dict[str, Any]]: ...


class TenantTools(Protocol):
    """Tools of the current tenant lent by its MCP servers (services.tool.mcp.McpServers)."""

    async def tool(self, tool_id: str) -> dict[str, Any] | None: ...

    async def tools(self) -> list[dict[str, Any]]: ...


class _NoSharedTools:
    def get(self, tool_id: str) -> dict[str, Any] | None:
        return None

    def all(self) -> list[dict[str, Any]]:
        return []


class ToolRegistry:
    """Reads and writes tool definitions in the current tenant."""

    def __init__(self, store: TenantStore, shared: SharedTools | None = None, mcp: TenantTools | None = None) -> None:
        self._store = store
        self._shared = shared or _NoSharedTools()
        self._mcp = mcp

    async def _mcp_tools(self) -> list[dict[str, Any]]:
        return await self._mcp.tools() if self._mcp is not None else []

    async def _mcp_tool(self, tool_id: str) -> dict[str, Any] | None:
        return await self._mcp.tool(tool_id) if self._mcp is not None else None

    async def all(self) -> list[dict[str, Any]]:
        """Built-in tools, then container tools by id, then MCP tools by id, then custom tools by creation time."""
        stored = await self._store.all(_TOOLS)
        custom = sorted(stored.values(), key=lambda t: (t["created_at"], t["tool_id"]))
        shared = [tool for tool in self._shared.all() if tool["tool_id"] not in stored]
        mcp = [tool for tool in await self._mcp_tools() if tool["tool_id"] not in stored]
        return [*BUILTIN_TOOLS.values(), *shared, *mcp, *custom]

    async def some(self, tool_ids: list[str]) -> list[dict[str, Any]]:
        """The tools that exist among ``tool_ids``, in that order."""
        custom = await self._store.get_many(_TOOLS, [t for t in tool_ids if t not in BUILTIN_TOOLS])
        found = [BUILTIN_TOOLS.get(t) or custom.get(t) or self._shared.get(t) for t in tool_ids]
        found = [tool or await self._mcp_tool(t) for t, tool in zip(tool_ids, found, strict=True)]
        return [tool for tool in found if tool is not None]

    async def get(self, tool_id: str) -> dict[str, Any]:
        if tool_id in BUILTIN_TOOLS:
            return BUILTIN_TOOLS[tool_id]
        tool = await self._store.get(_TOOLS, tool_id) or self._shared.get(tool_id) or await self._mcp_tool(tool_id)
        if tool is None:
            raise NotFound(f"tool '{tool_id}' not found")
        return tool

    async def create(self, spec: CustomToolSpec) -> dict[str, Any]:
        require_admin("creating a tool")
        tool = check_custom_tool(spec)
        if tool["tool_id"] in BUILTIN_TOOLS:
            raise AlreadyExists(f"tool '{tool['tool_id']}' already exists (built-in)")
        if self._shared.get(tool["tool_id"]) is not None:
            raise AlreadyExists(f"tool '{tool['tool_id']}' already exists (served by a tool container)")
        if await self._mcp_tool(tool["tool_id"]) is not None:
            raise AlreadyExists(f"tool '{tool['tool_id']}' already exists (lent by an MCP server)")
        tool["created_at"] = now_ms()
        tool["revision"] = secrets.token_hex(8)  # never shown; tells one definition of a tool id from the next
        if not await self._store.put_new(_TOOLS, tool["tool_id"], tool):
            raise AlreadyExists(f"tool '{tool['tool_id']}' already exists")
        return tool

    async def delete(self, tool_id: str) -> None:
        require_admin("deleting a tool")
        if tool_id in BUILTIN_TOOLS:
            raise PermissionDenied(f"tool '{tool_id}' is built in and cannot be deleted")
        if await self._store.delete(_TOOLS, tool_id):
            return
        if self._shared.get(tool_id) is not None:
            raise PermissionDenied(f"tool '{tool_id}' is served by a tool container and cannot be deleted")
        if await self._mcp_tool(tool_id) is not None:
            raise PermissionDenied(f"tool '{tool_id}' is lent by an MCP server: delete the server instead")
        raise NotFound(f"tool '{tool_id}' not found")
