"""MCP servers: a tenant's streamable-HTTP MCP servers, whose tools join its catalogue (API.md "MCP servers")."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from altan.api.common import ABSENT, ApiModel, HttpUrl, Name, Timestamp, validate
from altan.api.convert import rfc3339, timestamp
from altan.api.tools import MAX_CACHEABLE_SECONDS, RateLimit, ToolId
from altan.egress import destination
from altan.errors import InvalidArgument
from altan.v1 import tool_pb2

__all__ = [
    "MCP_SERVER_NAME_PATTERN",
    "McpServer",
    "McpServerList",
    "McpServerSpec",
    "McpToolOptions",
    "check_server_name",
    "mcp_server_json",
    "mcp_server_to_proto",
    "parse_mcp_server_spec",
    "server_spec_from_proto",
    "server_spec_to_proto",
]

# No `_`: a tool id is `<server>__<tool>`, and the server's part must end at the first `__`.
MCP_SERVER_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,30}$"
_SERVER_NAME = re.compile(MCP_SERVER_NAME_PATTERN)
OUTPUT_ONLY = ("tools", "created_at", "updated_at")

ServerName = Annotated[str, Field(pattern=MCP_SERVER_NAME_PATTERN)]
# An MCP tool's name as its server lists it (the key of ``tool_options``): MCP allows 1 to 128 of these characters.
McpToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")]
MAX_TOOL_OPTIONS = 200  # as many as a server may lend
MAX_TOOL_TIMEOUT_SECONDS = 3600.0


def _readable(url: str) -> str:
    # Read as the egress guard reads it: a URL it could not check could never be called.
    if not destination(url):
        raise ValueError("must be an http or https URL with a valid host and port")
    return url


class McpToolOptions(ApiModel):
    """What the tenant sets on one of the server's tools: the fields a custom tool has, applied the same way."""

    rate_limit: RateLimit = Field(default=ABSENT)
    requires_approval: bool = False
    cacheable_seconds: int = Field(default=0, ge=0, le=MAX_CACHEABLE_SECONDS)
    fallback_tool_id: ToolId = Field(default=ABSENT)
    timeout_seconds: float = Field(
        default=0, ge=0, le=MAX_TOOL_TIMEOUT_SECONDS, description="Budget of one call; 0 for the call deadline."
    )

    def stored(self) -> dict[str, Any]:
        """Only what differs from a tool without options."""
        return self.model_dump(exclude_defaults=True, exclude_none=True)


class McpServerSpec(ApiModel):
    """An MCP server as the tenant registers it (the name comes from the path)."""

    url: Annotated[HttpUrl, AfterValidator(_readable)] = Field(
        description="The MCP endpoint (streamable HTTP); it passes the egress rules."
    )
    credential: Name | None = Field(
        default=None, description="A credential of the tenant, sent to the server in its header."
    )
    tool_options: dict[McpToolName, McpToolOptions] = Field(
        default_factory=dict,
        max_length=MAX_TOOL_OPTIONS,
        description="Options of the server's tools, by the MCP tool's name (`add`, not `ref__add`).",
    )


class McpServer(BaseModel):
    """An MCP server as the API answers it."""

    name: str
    url: str
    credential: str | None = Field(default=ABSENT, description="Present when the server is sent a credential.")
    tools: list[str] = Field(description="The ids of the tools it lends (`<name>__<tool>`), as last listed.")
    tool_options: dict[str, McpToolOptions] | None = Field(
        default=ABSENT, description="Present when options are set on its tools."
    )
    created_at: Timestamp
    updated_at: Timestamp


class McpServerList(BaseModel):
    """One page of MCP servers, by name."""

    mcp_servers: list[McpServer]
    next_page_token: str | None = Field(default=ABSENT, description="Present when there is another page.")


def check_server_name(name: str) -> str:
    """A path's server name, checked with the words a body's field gets."""
    if not _SERVER_NAME.match(name):
        raise InvalidArgument(f"name: must match {MCP_SERVER_NAME_PATTERN}")
    return name


def parse_mcp_server_spec(body: Any) -> McpServerSpec:
    return validate(McpServerSpec, body, "body", output_only=OUTPUT_ONLY)


def _options_to_proto(options: dict[str, Any], out: tool_pb2.McpToolOptions) -> None:
    if options.get("rate_limit"):
        out.rate_limit.requests = options["rate_limit"]["requests"]
        out.rate_limit.per_seconds = options["rate_limit"]["per_seconds"]
    out.requires_approval = options.get("requires_approval", False)
    out.cacheable_seconds = options.get("cacheable_seconds", 0)
    out.fallback_tool_id = options.get("fallback_tool_id") or ""
    out.timeout_seconds = options.get("timeout_seconds", 0)


def _options_from_proto(msg: tool_pb2.McpToolOptions) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if msg.HasField("rate_limit"):
        fields["rate_limit"] = {"requests": msg.rate_limit.requests, "per_seconds": msg.rate_limit.per_seconds}
    for name in ("requires_approval", "cacheable_seconds", "fallback_tool_id", "timeout_seconds"):
        if getattr(msg, name):
            fields[name] = getattr(msg, name)
    return fields


def _options_json(msg: tool_pb2.McpToolOptions) -> dict[str, Any]:
    body = _options_from_proto(msg)
    body.setdefault("requires_approval", False)
    body.setdefault("cacheable_seconds", 0)
    return body


def server_spec_to_proto(name: str, spec: McpServerSpec) -> tool_pb2.McpServer:
    """The proto of a validated registration (the gateway's half of PutMcpServer)."""
    out = tool_pb2.McpServer(name=name, url=spec.url, credential=spec.credential or "")
    for tool, options in spec.tool_options.items():
        _options_to_proto(options.stored(), out.tool_options[tool])
    return out


def server_spec_from_proto(msg: tool_pb2.McpServer) -> tuple[str, McpServerSpec]:
    """The name and registration of a PutMcpServer request, checked by the same model as a REST body."""
    fields: dict[str, Any] = {"url": msg.url}
    if msg.credential:
        fields["credential"] = msg.credential
    if msg.tools:
        fields["tools"] = list(msg.tools)
    if msg.tool_options:
        fields["tool_options"] = {tool: _options_from_proto(o) for tool, o in msg.tool_options.items()}
    for name in ("created_at", "updated_at"):
        if msg.HasField(name):
            fields[name] = True
    return check_server_name(msg.name), parse_mcp_server_spec(fields)


def mcp_server_to_proto(server: dict[str, Any]) -> tool_pb2.McpServer:
    """The proto of a stored server."""
    out = tool_pb2.McpServer(
        name=server["name"],
        url=server["url"],
        credential=server.get("credential") or "",
        tools=sorted(server.get("tools", {})),
        created_at=timestamp(server["created_at"]),
        updated_at=timestamp(server["updated_at"]),
    )
    for tool, options in (server.get("tool_options") or {}).items():
        _options_to_proto(options, out.tool_options[tool])
    return out


def mcp_server_json(msg: tool_pb2.McpServer) -> dict[str, Any]:
    """The REST form of a server (the :class:`McpServer` model)."""
    body: dict[str, Any] = {"name": msg.name, "url": msg.url}
    if msg.credential:
        body["credential"] = msg.credential
    body["tools"] = list(msg.tools)
    if msg.tool_options:
        body["tool_options"] = {tool: _options_json(msg.tool_options[tool]) for tool in sorted(msg.tool_options)}
    body.update(created_at=rfc3339(msg.created_at), updated_at=rfc3339(msg.updated_at))
    return body
