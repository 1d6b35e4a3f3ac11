"""gRPC face of the Tool Service: translates protos to the registry and executor and back."""

from __future__ import annotations

from typing import Any

import grpc

from altan.v1 import tool_pb2, tool_pb2_grpc
from altan.wire import dump_json, load_json, paginate
from services.tool.executor import Credential, ToolExecutor
from services.tool.registry import ToolRegistry

__all__ = ["ToolServicer", "tool_to_proto"]


def tool_to_proto(tool: dict[str, Any]) -> tool_pb2.Tool:
    return tool_pb2.Tool(
        tool_id=tool["tool_id"],
        name=tool.get("name", ""),
        description=tool.get("description", ""),
        kind=tool["type"],
        input_schema_json=dump_json(tool["input_schema"]),
        definition_json=dump_json(tool),
    )


class ToolServicer(tool_pb2_grpc.ToolServiceServicer):
    def __init__(self, registry: ToolRegistry, executor: ToolExecutor) -> None:
        self._registry = registry
        self._executor = executor

    async def ListTools(self, request: tool_pb2.ListToolsRequest, context: grpc.aio.ServicerContext) -> Any:
        tools = await self._registry.some(list(request.tool_ids)) if request.tool_ids else await self._registry.all()
        page, token = paginate(tools, request.page_size, request.page_token, default=100, maximum=500)
        return tool_pb2.ListToolsResponse(tools=[tool_to_proto(t) for t in page], next_page_token=token)

    async def GetTool(self, request: tool_pb2.GetToolRequest, context: grpc.aio.ServicerContext) -> Any:
        return tool_pb2.GetToolResponse(tool=tool_to_proto(await self._registry.get(request.tool_id)))

    async def CreateTool(self, request: tool_pb2.CreateToolRequest, context: grpc.aio.ServicerContext) -> Any:
        tool = await self._registry.create(load_json(request.spec_json, "tool"))
        return tool_pb2.CreateToolResponse(tool=tool_to_proto(tool))

    async def DeleteTool(self, request: tool_pb2.DeleteToolRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._registry.delete(request.tool_id)
        return tool_pb2.DeleteToolResponse()

    async def ExecuteTool(self, request: tool_pb2.ExecuteToolRequest, context: grpc.aio.ServicerContext) -> Any:
        credential = None
        if request.HasField("credential"):
            c = request.credential
            credential = Credential(name=c.name, header=c.header, prefix=c.prefix, value=c.value)
        result = await self._executor.execute(
            request.tool_id,
            load_json(request.arguments_json, "arguments", default={}),
            credential,
            request.timeout_seconds or None,
        )
        return tool_pb2.ExecuteToolResponse(
            output_json=dump_json(result.output),
            http_status=result.http_status,
            target=result.target,
            retry_after_seconds=result.retry_after or 0.0,
        )
