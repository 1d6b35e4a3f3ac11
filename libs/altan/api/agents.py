"""Agents: an LLM configuration plus bound tools (API.md "REST resources", "LLM configuration")."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from google.protobuf.field_mask_pb2 import FieldMask
from pydantic import AfterValidator, BaseModel, Field

from altan.api.common import ABSENT, ApiModel, HttpUrl, JsonObject, Name, Timestamp, check_struct_bytes, validate
from altan.api.convert import (
    enum_name,
    enum_value,
    python_to_struct,
    rfc3339,
    struct_to_dict,
    timestamp,
)
from altan.errors import InvalidArgument
from altan.v1 import agent_pb2, common_pb2

__all__ = [
    "OUTPUT_ONLY",
    "PATCHABLE",
    "Agent",
    "AgentList",
    "AgentPatch",
    "AgentSpec",
    "LlmAuth",
    "LlmConfig",
    "ToolRef",
    "agent_json",
    "agent_spec_from_proto",
    "agent_spec_to_proto",
    "agent_to_proto",
    "llm_to_proto",
    "parse_agent_patch",
    "parse_agent_spec",
    "patch_from_proto",
    "patch_to_proto",
]

_AUTH = common_pb2.AuthType.DESCRIPTOR
_PROVIDER = agent_pb2.LlmProvider.DESCRIPTOR

# Any tool id the catalogue can hold (built-in, custom, container or MCP).
ToolRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")]


def _unique(items: list[str]) -> list[str]:
    if len(set(items)) != len(items):
        raise ValueError("a tool is listed twice")
    return items


BoundTools = Annotated[
    list[ToolRef], Field(max_length=200, json_schema_extra={"uniqueItems": True}), AfterValidator(_unique)
]


class LlmAuth(ApiModel):
    """How the platform authenticates to the LLM endpoint."""

    type: Literal["api_key", "oauth2", "none"] = "api_key"
    credential: Name | None = Field(default=ABSENT, description="The tenant's credential that holds the key or token.")


class LlmConfig(ApiModel):
    """One LLM an agent may call."""

    llm_id: str = Field(min_length=1, max_length=200, description="The model, for example gpt-4o.")
    provider: Literal["openai", "anthropic"] = Field(description="The wire format the endpoint speaks.")
    endpoint: HttpUrl
    auth: LlmAuth | None = None
    parameters: JsonObject = Field(default_factory=dict, description="Request parameters, e.g. max_tokens.")


class AgentSpec(ApiModel):
    """An agent as the tenant writes it (at most 2,000 JSON values in all)."""

    max_values = 2000

    name: str = Field(min_length=1, max_length=200)
    instructions: str = Field(default="", max_length=100_000, description="System instructions for the LLM.")
    llm: LlmConfig | None = None
    fallback_llms: list[LlmConfig] = Field(default_factory=list, max_length=10)
    tools: BoundTools = Field(default_factory=list, description="Tools the agent may use; each must exist.")


class AgentPatch(ApiModel):
    """The fields of an agent to replace; `llm: null` removes the LLM (at most 2,000 JSON values in all)."""

    max_values = 2000

    name: str = Field(default=ABSENT, min_length=1, max_length=200)
    instructions: str = Field(default=ABSENT, max_length=100_000)
    llm: LlmConfig | None = None
    fallback_llms: list[LlmConfig] = Field(default=ABSENT, max_length=10)
    tools: BoundTools = Field(default=ABSENT)


PATCHABLE = tuple(AgentPatch.model_fields)
OUTPUT_ONLY = ("id", "created_at", "updated_at")


class Agent(BaseModel):
    """An agent as the API answers it."""

    id: str
    name: str
    instructions: str
    llm: LlmConfig | None
    fallback_llms: list[LlmConfig]
    tools: list[str]
    created_at: Timestamp
    updated_at: Timestamp


class AgentList(BaseModel):
    """One page of agents, oldest first."""

    agents: list[Agent]
    next_page_token: str | None = Field(default=ABSENT, description="Present when there is another page.")


# --- protos -----------------------------------------------------------------------------------------------


def _llm_to_proto(llm: dict[str, Any], out: agent_pb2.LlmConfig) -> None:
    out.llm_id = llm["llm_id"]
    out.provider = enum_value(_PROVIDER, llm["provider"])  # type: ignore[assignment]
    out.endpoint = llm["endpoint"]
    auth = llm.get("auth")
    if auth is not None:
        out.auth.type = enum_value(_AUTH, auth.get("type", "api_key"))  # type: ignore[assignment]
        out.auth.credential = auth.get("credential") or ""
    if llm.get("parameters"):
        python_to_struct(llm["parameters"], out.parameters)


def llm_to_proto(llm: dict[str, Any]) -> agent_pb2.LlmConfig:
    """The proto of a stored LLM configuration (what the Agent Service sends the Integrator for a turn)."""
    out = agent_pb2.LlmConfig()
    _llm_to_proto(llm, out)
    return out


def _llm_from_proto(msg: agent_pb2.LlmConfig) -> dict[str, Any]:
    llm: dict[str, Any] = {}
    if msg.llm_id:
        llm["llm_id"] = msg.llm_id
    if msg.provider:
        llm["provider"] = enum_name(_PROVIDER, msg.provider) or f"unknown provider {msg.provider}"
    if msg.endpoint:
        llm["endpoint"] = msg.endpoint
    if msg.HasField("auth"):
        auth: dict[str, Any] = {}
        if msg.auth.type:
            auth["type"] = enum_name(_AUTH, msg.auth.type) or f"unknown auth type {msg.auth.type}"
        if msg.auth.credential:
            auth["credential"] = msg.auth.credential
        llm["auth"] = auth
    if msg.HasField("parameters"):
        llm["parameters"] = struct_to_dict(msg.parameters)
    return llm


def _fields_to_proto(fields: dict[str, Any], out: agent_pb2.Agent) -> None:
    if "name" in fields:
        out.name = fields["name"]
    if "instructions" in fields:
        out.instructions = fields["instructions"]
    if fields.get("llm") is not None:
        _llm_to_proto(fields["llm"], out.llm)
    for llm in fields.get("fallback_llms") or ():
        _llm_to_proto(llm, out.fallback_llms.add())
    out.tools.extend(fields.get("tools") or ())


def _check_structs(msg: agent_pb2.Agent) -> None:
    sizes = [msg.llm.parameters.ByteSize()] + [llm.parameters.ByteSize() for llm in msg.fallback_llms]
    check_struct_bytes(sum(sizes), "agent")


def _output_only(msg: agent_pb2.Agent) -> dict[str, Any]:
    # Given on the wire, they reach the model and are refused there, with the same message as in a REST body.
    fields: dict[str, Any] = {"id": msg.id} if msg.id else {}
    fields.update({name: True for name in ("created_at", "updated_at") if msg.HasField(name)})
    return fields


def parse_agent_spec(body: Any) -> AgentSpec:
    """An agent to create, from a REST body or a proto (via :func:`agent_spec_from_proto`)."""
    return validate(AgentSpec, body, "agent", output_only=OUTPUT_ONLY)


def parse_agent_patch(body: Any) -> AgentPatch:
    """The changes of an agent, from a REST body or a proto (via :func:`patch_from_proto`)."""
    return validate(AgentPatch, body, "agent", output_only=OUTPUT_ONLY)


def agent_spec_to_proto(spec: AgentSpec) -> agent_pb2.Agent:
    """The proto of a validated spec (the gateway's half of CreateAgent)."""
    out = agent_pb2.Agent()
    _fields_to_proto(spec.model_dump(exclude_none=True), out)
    return out


def agent_spec_from_proto(msg: agent_pb2.Agent) -> AgentSpec:
    """The spec in a CreateAgent request, checked by the same model as a REST body."""
    _check_structs(msg)
    fields = _output_only(msg)
    if msg.name:
        fields["name"] = msg.name
    if msg.instructions:
        fields["instructions"] = msg.instructions
    if msg.HasField("llm"):
        fields["llm"] = _llm_from_proto(msg.llm)
    if msg.fallback_llms:
        fields["fallback_llms"] = [_llm_from_proto(llm) for llm in msg.fallback_llms]
    if msg.tools:
        fields["tools"] = list(msg.tools)
    return parse_agent_spec(fields)


def patch_to_proto(patch: AgentPatch) -> tuple[agent_pb2.Agent, FieldMask]:
    """The proto and field mask of a validated patch: every field the body named, `llm: null` included."""
    named = sorted(patch.model_fields_set)
    out = agent_pb2.Agent()
    _fields_to_proto(patch.model_dump(include=set(named)), out)
    return out, FieldMask(paths=named)


def patch_from_proto(msg: agent_pb2.Agent, mask: FieldMask) -> dict[str, Any]:
    """The fields an UpdateAgent request replaces, with their new values (``None`` clears ``llm``).

    An empty mask names every field that is set, as AIP-134 has it.
    """
    _check_structs(msg)
    paths = list(mask.paths)
    if not paths:
        paths = [name for name in PATCHABLE if (msg.HasField("llm") if name == "llm" else bool(getattr(msg, name)))]
    unknown = sorted(set(paths) - set(PATCHABLE))
    if unknown:
        raise InvalidArgument(f"update_mask: {unknown[0]!r} cannot be changed (only {', '.join(PATCHABLE)})")
    changes = _output_only(msg)
    for name in dict.fromkeys(paths):
        if name == "llm":
            changes["llm"] = _llm_from_proto(msg.llm) if msg.HasField("llm") else None
        elif name == "fallback_llms":
            changes[name] = [_llm_from_proto(llm) for llm in msg.fallback_llms]
        elif name == "tools":
            changes[name] = list(msg.tools)
        else:
            changes[name] = getattr(msg, name)
    parse_agent_patch(changes)
    return changes


def agent_to_proto(doc: dict[str, Any]) -> agent_pb2.Agent:
    """The proto of a stored agent."""
    out = agent_pb2.Agent(
        id=doc["id"], created_at=timestamp(doc["created_at"]), updated_at=timestamp(doc["updated_at"])
    )
    _fields_to_proto(doc, out)
    return out


# --- REST -------------------------------------------------------------------------------------------------


def _llm_json(msg: agent_pb2.LlmConfig) -> dict[str, Any]:
    llm: dict[str, Any] = {
        "llm_id": msg.llm_id,
        "provider": enum_name(_PROVIDER, msg.provider),
        "endpoint": msg.endpoint,
        "parameters": struct_to_dict(msg.parameters),
    }
    if msg.HasField("auth"):
        llm["auth"] = {"type": enum_name(_AUTH, msg.auth.type) or "api_key"}
        if msg.auth.credential:
            llm["auth"]["credential"] = msg.auth.credential
    return llm


def agent_json(msg: agent_pb2.Agent) -> dict[str, Any]:
    """The REST form of an agent (the :class:`Agent` model)."""
    return {
        "id": msg.id,
        "name": msg.name,
        "instructions": msg.instructions,
        "llm": _llm_json(msg.llm) if msg.HasField("llm") else None,
        "fallback_llms": [_llm_json(llm) for llm in msg.fallback_llms],
        "tools": list(msg.tools),
        "created_at": rfc3339(msg.created_at),
        "updated_at": rfc3339(msg.updated_at),
    }
