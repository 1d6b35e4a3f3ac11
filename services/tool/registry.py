"""The tenant's tool registry: built-in tools for everyone, custom tools per tenant."""

from __future__ import annotations

import secrets
from typing import Any

from altan.api.convert import now_ms
from altan.api.tools import CustomToolSpec
from altan.context import require_admin
from altan.errors import AlreadyExists, NotFound, PermissionDenied
from altan.store import TenantStore
from services.tool.builtins import BUILTIN_TOOLS
from services.tool.schema import check_custom_tool

__all__ = ["ToolRegistry"]

_TOOLS = "tools"


class ToolRegistry:
    """Reads and writes tool definitions in the current tenant."""

    def __init__(self, store: TenantStore) -> None:
        self._store = store

    async def all(self) -> list[dict[str, Any]]:
        custom = sorted((await self._store.all(_TOOLS)).values(), key=lambda t: (t["created_at"], t["tool_id"]))
        return [*BUILTIN_TOOLS.values(), *custom]

    async def some(self, tool_ids: list[str]) -> list[dict[str, Any]]:
        """The tools that exist among ``tool_ids``, in that order."""
        custom = await self._store.get_many(_TOOLS, [t for t in tool_ids if t not in BUILTIN_TOOLS])
        found = [BUILTIN_TOOLS.get(t) or custom.get(t) for t in tool_ids]
        return [tool for tool in found if tool is not None]

    async def get(self, tool_id: str) -> dict[str, Any]:
        if tool_id in BUILTIN_TOOLS:
            return BUILTIN_TOOLS[tool_id]
        tool = await self._store.get(_TOOLS, tool_id)
        if tool is None:
            raise NotFound(f"tool '{tool_id}' not found")
        return tool

    async def create(self, spec: CustomToolSpec) -> dict[str, Any]:
        require_admin("creating a tool")
        tool = check_custom_tool(spec)
        if tool["tool_id"] in BUILTIN_TOOLS:
            raise AlreadyExists(f"tool '{tool['tool_id']}' already exists (built-in)")
        tool["created_at"] = now_ms()
        tool["revision"] = secrets.token_hex(8)  # never shown; tells one definition of a tool id from the next
        if not await self._store.put_new(_TOOLS, tool["tool_id"], tool):
            raise AlreadyExists(f"tool '{tool['tool_id']}' already exists")
        return tool

    async def delete(self, tool_id: str) -> None:
        require_admin("deleting a tool")
        if tool_id in BUILTIN_TOOLS:
            raise PermissionDenied(f"tool '{tool_id}' is built in and cannot be deleted")
        if not await self._store.delete(_TOOLS, tool_id):
            raise NotFound(f"tool '{tool_id}' not found")
