"""The tenant's agents: validated definitions with an LLM configuration and bound tools."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from altan.api.agents import PATCHABLE, AgentSpec, parse_agent_spec
from altan.api.convert import now_ms
from altan.context import require_admin
from altan.errors import InvalidArgument, NotFound
from altan.store import TenantStore
from altan.wire import new_id

__all__ = ["AgentCatalog", "ToolLookup"]

_AGENTS = "agents"

# Answers which of the given tool ids do not exist in the tenant.
ToolLookup = Callable[[list[str]], Awaitable[list[str]]]


class AgentCatalog:
    """Agents of the current tenant."""

    def __init__(self, store: TenantStore, missing_tools: ToolLookup) -> None:
        self._store = store
        self._missing_tools = missing_tools

    async def create(self, spec: AgentSpec) -> dict[str, Any]:
        require_admin("creating an agent")
        await self._check_tools(spec.tools)
        now = now_ms()
        agent = {"id": new_id("agt"), **spec.model_dump(exclude_none=True), "created_at": now, "updated_at": now}
        await self._store.put(_AGENTS, agent["id"], agent)
        return agent

    async def get(self, agent_id: str) -> dict[str, Any]:
        agent = await self._store.get(_AGENTS, agent_id)
        if agent is None:
            raise NotFound(f"agent '{agent_id}' not found")
        return agent

    async def all(self) -> list[dict[str, Any]]:
        return sorted((await self._store.all(_AGENTS)).values(), key=lambda a: a["id"])

    async def update(self, agent_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Replace the fields named in ``changes`` (checked by :func:`~altan.api.agents.patch_from_proto`);
        ``llm: None`` removes the LLM."""
        require_admin("changing an agent")
        agent = await self.get(agent_id)
        fields = {k: agent[k] for k in PATCHABLE if k in agent} | changes
        spec = parse_agent_spec({k: v for k, v in fields.items() if v is not None})
        if "tools" in changes:
            await self._check_tools(spec.tools)
        updated = {
            "id": agent_id,
            **spec.model_dump(exclude_none=True),
            "created_at": agent["created_at"],
            "updated_at": now_ms(),
        }
        await self._store.put(_AGENTS, agent_id, updated)
        return updated

    async def delete(self, agent_id: str) -> None:
        require_admin("deleting an agent")
        if not await self._store.delete(_AGENTS, agent_id):
            raise NotFound(f"agent '{agent_id}' not found")

    async def _check_tools(self, tools: list[str]) -> None:
        if tools:
            missing = await self._missing_tools(tools)
            if missing:
                raise InvalidArgument(f"tools: unknown tool '{missing[0]}'")
