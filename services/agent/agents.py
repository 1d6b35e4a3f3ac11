"""The tenant's agents: validated definitions with an LLM configuration and bound tools."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from altan.context import require_admin
from altan.errors import InvalidArgument, NotFound
from altan.store import TenantStore
from altan.wire import new_id, now_iso, validate_model

__all__ = ["AgentCatalog", "ToolLookup"]

_AGENTS = "agents"

# Answers which of the given tool ids do not exist in the tenant.
ToolLookup = Callable[[list[str]], Awaitable[list[str]]]


class LlmAuth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["api_key", "oauth2", "none"] = "api_key"
    credential: str | None = Field(default=None, min_length=1, max_length=128)


class LlmConfig(BaseModel):
    """API.md "LLM configuration"."""

    model_config = ConfigDict(extra="forbid")
    llm_id: str = Field(min_length=1, max_length=200)
    provider: Literal["openai", "anthropic"]
    endpoint: str = Field(pattern=r"^https?://", max_length=2048)
    auth: LlmAuth | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class AgentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    instructions: str = Field(default="", max_length=100_000)
    llm: LlmConfig | None = None
    fallback_llms: list[LlmConfig] = Field(default_factory=list, max_length=10)
    tools: list[str] = Field(default_factory=list, max_length=200)


def _validate(body: Any) -> AgentSpec:
    spec = validate_model(AgentSpec, body, "agent")
    if len(set(spec.tools)) != len(spec.tools):
        raise InvalidArgument("tools: a tool is listed twice")
    return spec


class AgentCatalog:
    """Agents of the current tenant."""

    def __init__(self, store: TenantStore, missing_tools: ToolLookup) -> None:
        self._store = store
        self._missing_tools = missing_tools

    async def create(self, body: Any) -> dict[str, Any]:
        require_admin("creating an agent")
        spec = _validate(body)
        await self._check_tools(spec.tools)
        now = now_iso()
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

    async def update(self, agent_id: str, patch: Any) -> dict[str, Any]:
        require_admin("changing an agent")
        if not isinstance(patch, dict):
            raise InvalidArgument("agent: must be a JSON object")
        agent = await self.get(agent_id)
        fields = {k: v for k, v in agent.items() if k not in ("id", "created_at", "updated_at")}
        spec = _validate({**fields, **patch})
        if "tools" in patch:
            await self._check_tools(spec.tools)
        updated = {
            "id": agent_id,
            **spec.model_dump(exclude_none=True),
            "created_at": agent["created_at"],
            "updated_at": now_iso(),
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
