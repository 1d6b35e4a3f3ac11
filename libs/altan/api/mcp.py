"""MCP servers: a tenant's streamable-HTTP MCP servers, whose tools join its catalogue (API.md "MCP servers")."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from altan.api.common import ABSENT, ApiModel, HttpUrl, Name, Timestamp, validate
from altan.api.convert import rfc3339, timestamp
from altan.egress import destination
from altan.errors import InvalidArgument
from altan.v1 import tool_pb2

__all__ = [
    "MCP_SERVER_NAME_PATTERN",
    "McpServer",
    "McpServerList",
    "McpServerSpec",
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


def _readable(url: str) -> str:
    # Read as the egress guard reads it: a URL it could not check could never be called.
    if not destination(url):
        raise ValueError("must be an http or https URL with a valid host and port")
    return url


class McpServerSpec(ApiModel):
    """An MCP server as the tenant registers it (the name comes from the path)."""

    url: Annotated[HttpUrl, AfterValidator(_readable)] = Field(
        description="The MCP endpoint (streamable HTTP); it passes the egress rules."
    )
    credential: Name | None = Field(
        default=None, description="A credential of the tenant, sent to the server in its header."
    )


class McpServer(BaseModel):
    """An MCP server as the API answers it."""

    name: str
    url: str
    credential: str | None = Field(default=ABSENT, description="Present when the server is sent a credential.")
    tools: list[str] = Field(description="The ids of the tools it lends (`<name>__<tool>`), as last listed.")
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


def server_spec_to_proto(name: str, spec: McpServerSpec) -> tool_pb2.McpServer:
    """The proto of a validated registration (the gateway's half of PutMcpServer)."""
    return tool_pb2.McpServer(name=name, url=spec.url, credential=spec.credential or "")


def server_spec_from_proto(msg: tool_pb2.McpServer) -> tuple[str, McpServerSpec]:
    """The name and registration of a PutMcpServer request, checked by the same model as a REST body."""
    fields: dict[str, Any] = {"url": msg.url}
    if msg.credential:
        fields["credential"] = msg.credential
    if msg.tools:
        fields["tools"] = list(msg.tools)
    for name in ("created_at", "updated_at"):
        if msg.HasField(name):
            fields[name] = True
    return check_server_name(msg.name), parse_mcp_server_spec(fields)


def mcp_server_to_proto(server: dict[str, Any]) -> tool_pb2.McpServer:
    """The proto of a stored server."""
    return tool_pb2.McpServer(
        name=server["name"],
        url=server["url"],
        credential=server.get("credential") or "",
        tools=sorted(server.get("tools", {})),
        created_at=timestamp(server["created_at"]),
        updated_at=timestamp(server["updated_at"]),
    )


def mcp_server_json(msg: tool_pb2.McpServer) -> dict[str, Any]:
    """The REST form of a server (the :class:`McpServer` model)."""
    body: dict[str, Any] = {"name": msg.name, "url": msg.url}
    if msg.credential:
        body["credential"] = msg.credential
    body.update(tools=list(msg.tools), created_at=rfc3339(msg.created_at), updated_at=rfc3339(msg.updated_at))
    return body
