"""``python -m services.agent``: the Agent Service."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from altan.api.convert import struct_to_dict
from altan.bootstrap import run_service
from altan.clients import IntegratorClient
from altan.config import Settings
from altan.errors import Unavailable
from altan.server import GrpcService
from altan.store import TenantStore, open_state
from altan.tls import tls_files
from altan.v1 import agent_pb2_grpc, runtime_pb2
from altan.wire import json_bytes
from services.agent.agents import AgentCatalog
from services.agent.conversation import LoopLimits
from services.agent.plan import Step
from services.agent.servicer import AgentServicer
from services.agent.tasks import LlmBackend, TaskLimits, TaskRunner, ToolAnswer


async def wire(settings: Settings, stack: AsyncExitStack) -> list[GrpcService]:
    backend = open_state(settings)
    stack.push_async_callback(backend.aclose)
    integrator = IntegratorClient(settings.integrator_addr, settings.call_deadline_seconds, tls_files(settings))
    stack.push_async_callback(integrator.aclose)

    async def missing_tools(tool_ids: list[str]) -> list[str]:
        request = runtime_pb2.DescribeToolsRequest(tool_ids=tool_ids)
        return list((await integrator.call(integrator.runtime.DescribeTools, request)).missing)

    async def invoke(agent: dict[str, Any], step: Step, arguments: dict[str, Any], task_id: str) -> ToolAnswer:
        request = runtime_pb2.RunToolRequest(
            tool_id=step.tool,
            arguments_json=json_bytes(arguments),
            agent_id=agent["id"],
            bound_tool_ids=agent.get("tools", []),
            task_id=task_id,
            step_id=step.id,
        )
        # The integrator retries within its own deadline; allow it that long plus the hop.
        answer = await integrator.call(integrator.runtime.RunTool, request, timeout=settings.call_deadline_seconds + 5)
        # Written by the Tool Service after it checked what the third party sent (altan.wire.parse_json).
        output = json.loads(answer.output_json) if answer.output_json else None
        return ToolAnswer(output, answer.http_status, len(answer.output_json))

    async def model_turn(
        request: runtime_pb2.CompleteRequest, on_delta: Callable[[str], Awaitable[None]]
    ) -> runtime_pb2.ModelAnswer:
        stream = integrator.stream(integrator.runtime.Complete, request, timeout=settings.llm_deadline_seconds + 10)
        async for item in stream:
            if item.WhichOneof("kind") == "delta":
                await on_delta(item.delta)
            else:
                return item.answer
        raise Unavailable("the integrator ended a model turn without its answer")

    async def describe(tool_ids: list[str]) -> list[runtime_pb2.ModelTool]:
        """The bound tools as the model sees them: name, description, JSON Schema."""
        if not tool_ids:
            return []
        answer = await integrator.call(
            integrator.runtime.DescribeTools, runtime_pb2.DescribeToolsRequest(tool_ids=tool_ids)
        )
        return [
            runtime_pb2.ModelTool(
                name=tool.tool_id,
                description=tool.description or tool.name,
                input_schema_json=json_bytes(struct_to_dict(tool.input_schema)),
            )
            for tool in answer.tools
        ]

    llm = LlmBackend(
        model=model_turn,
        describe=describe,
        loop=LoopLimits(
            max_turns=settings.max_llm_turns,
            max_tool_result_chars=settings.max_tool_result_chars,
            max_tool_call_errors=settings.max_tool_call_errors,
        ),
        context_budget_tokens=settings.context_budget_tokens,
        tool_concurrency=settings.tool_concurrency,
    )
    store = TenantStore(backend, "agent")
    agents = AgentCatalog(store, missing_tools)
    limits = TaskLimits(expansion_bytes=settings.max_expansion_bytes, task_bytes=settings.max_task_bytes)
    tasks = TaskRunner(store, agents, missing_tools, invoke, limits, llm)
    stack.push_async_callback(tasks.aclose)  # before the store and channel close (the stack unwinds in reverse)
    servicer = AgentServicer(agents, tasks)
    return [
        GrpcService(
            agent_pb2_grpc.add_AgentServiceServicer_to_server, servicer, "altan.v1.AgentService", ready=backend.ping
        )
    ]


if __name__ == "__main__":
    run_service("agent", lambda s: s.agent_port, wire)
