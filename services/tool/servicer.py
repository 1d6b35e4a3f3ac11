"""gRPC faces of the Tool Service: the public catalogue and the internal executor."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from altan import context
from altan.api.mcp import mcp_server_to_proto, server_spec_from_proto
from altan.api.tools import tool_spec_from_proto, tool_to_proto
from altan.errors import FailedPrecondition
from altan.server import Context
from altan.v1 import runtime_pb2, runtime_pb2_grpc, tool_pb2, tool_pb2_grpc
from altan.wire import json_bytes, paginate, parse_json
from services.tool.executor import Credential, ToolExecutor
from services.tool.mcp import McpServers
from services.tool.registry import ToolRegistry

__all__ = ["ToolRuntimeServicer", "ToolServicer"]


class ToolServicer(tool_pb2_grpc.ToolServiceServicer):
    """The tenant's catalogue (public)."""

    def __init__(self, registry: ToolRegistry, mcp: McpServers, cache_size: int = 4096) -> None:
        self._registry = registry
        self._mcp = mcp
        self._protos: OrderedDict[tuple[str, str, str], tool_pb2.Tool] = OrderedDict()
        self._cache_size = cache_size

    def _proto(self, tool: dict[str, Any]) -> tool_pb2.Tool:
        """The proto of a tool, built once: a stored tool never changes (it is deleted and created again, with a new
        revision), and building its input_schema's Struct costs more than the rest of a GetTool, which every custom
        tool call makes."""
        if tool.get("type") == "builtin":
            key = ("", tool["tool_id"], "builtin")
        elif tool.get("type") == "container":
            key = ("", tool["tool_id"], tool["revision"])  # the same for every tenant
        elif tool.get("revision"):
            key = (context.current().tenant_id, tool["tool_id"], tool["revision"])
        else:
            return tool_to_proto(tool)
        proto = self._protos.get(key)
        if proto is None:
            proto = self._protos[key] = tool_to_proto(tool)
            if len(self._protos) > self._cache_size:
                self._protos.popitem(last=False)
        return proto

    async def ListTools(self, request: tool_pb2.ListToolsRequest, context: Context) -> tool_pb2.ListToolsResponse:
        tools = await self._registry.some(list(request.tool_ids)) if request.tool_ids else await self._registry.all()
        page, token = paginate(tools, request.page_size, request.page_token, default=100, maximum=500)
        return tool_pb2.ListToolsResponse(tools=[self._proto(t) for t in page], next_page_token=token)

    async def GetTool(self, request: tool_pb2.GetToolRequest, context: Context) -> tool_pb2.GetToolResponse:
        return tool_pb2.GetToolResponse(tool=self._proto(await self._registry.get(request.tool_id)))

    async def CreateTool(self, request: tool_pb2.CreateToolRequest, context: Context) -> tool_pb2.CreateToolResponse:
        tool = await self._registry.create(tool_spec_from_proto(request.tool))
        return tool_pb2.CreateToolResponse(tool=self._proto(tool))

    async def DeleteTool(self, request: tool_pb2.DeleteToolRequest, context: Context) -> tool_pb2.DeleteToolResponse:
        await self._registry.delete(request.tool_id)
        return tool_pb2.DeleteToolResponse()

    async def GetMcpServer(
        self, request: tool_pb2.GetMcpServerRequest, context: Context
    ) -> tool_pb2.GetMcpServerResponse:
        return tool_pb2.GetMcpServerResponse(server=mcp_server_to_proto(await self._mcp.get(request.name)))

    async def ListMcpServers(
        self, request: tool_pb2.ListMcpServersRequest, context: Context
    ) -> tool_pb2.ListMcpServersResponse:
        servers = await self._mcp.all()
        page, token = paginate(servers, request.page_size, request.page_token, default=100, maximum=500)
        return tool_pb2.ListMcpServersResponse(servers=[mcp_server_to_proto(s) for s in page], next_page_token=token)

    async def DeleteMcpServer(
        self, request: tool_pb2.DeleteMcpServerRequest, context: Context
    ) -> tool_pb2.DeleteMcpServerResponse:
        await self._mcp.delete(request.name)
        return tool_pb2.DeleteMcpServerResponse()


class ToolRuntimeServicer(runtime_pb2_grpc.ToolRuntimeServiceServicer):
    """Runs tool calls for the Integrator Engine (internal: it receives credentials)."""

    def __init__(self, executor: ToolExecutor, mcp: McpServers, max_output_bytes: int) -> None:
        self._executor = executor
        self._mcp = mcp
        self._max_output_bytes = max_output_bytes

    async def SyncMcpServer(
        self, request: runtime_pb2.SyncMcpServerRequest, context: Context
    ) -> runtime_pb2.SyncMcpServerResponse:
        name, spec = server_spec_from_proto(request.server)
        credential = _credential(request.credential) if request.HasField("credential") else None
        server, created = await self._mcp.sync(name, spec, credential, request.timeout_seconds or None)
        return runtime_pb2.SyncMcpServerResponse(server=mcp_server_to_proto(server), created=created)

    async def ExecuteTool(
        self, request: runtime_pb2.ExecuteToolRequest, context: Context
    ) -> runtime_pb2.ExecuteToolResponse:
        credential = _credential(request.credential) if request.HasField("credential") else None
        result = await self._executor.execute(
            request.tool_id,
            parse_json(request.arguments_json, "arguments", default={}),
            credential,
            request.timeout_seconds or None,
            arguments_size=len(request.arguments_json),
            idempotency_key=request.idempotency_key,
        )
        output = json_bytes(result.output)
        if len(output) > self._max_output_bytes:
            raise FailedPrecondition(
                f"the output of tool '{request.tool_id}' is {len(output)} bytes, over the limit of "
                f"{self._max_output_bytes} (ALTAN_MAX_OUTPUT_BYTES)"
            )
        return runtime_pb2.ExecuteToolResponse(
            output_json=output,
            http_status=result.http_status,
            target=result.target,
            retry_after_seconds=result.retry_after or 0.0,
        )


def _credential(c: runtime_pb2.InjectedCredential) -> Credential:
    return Credential(name=c.name, header=c.header, prefix=c.prefix, value=c.value, hosts=tuple(c.hosts))
