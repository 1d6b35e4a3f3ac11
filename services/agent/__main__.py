"""``python -m services.agent``: the Agent Service."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from altan.bootstrap import run_service
from altan.clients import integrator_client
from altan.config import Settings
from altan.server import GrpcService
from altan.store import TenantStore, open_backend
from altan.v1 import agent_pb2_grpc, integrator_pb2
from altan.wire import dump_json, load_json
from services.agent.agents import AgentCatalog
from services.agent.plan import Step
from services.agent.servicer import AgentServicer
from services.agent.tasks import TaskRunner


async def wire(settings: Settings, stack: AsyncExitStack) -> list[GrpcService]:
    backend = open_backend(settings.redis_url)
    stack.push_async_callback(backend.aclose)
    integrator = integrator_client(settings.integrator_addr, settings.call_deadline_seconds)
    stack.push_async_callback(integrator.aclose)

    async def missing_tools(tool_ids: list[str]) -> list[str]:
        answer = await integrator.call("DescribeTools", integrator_pb2.DescribeToolsRequest(tool_ids=tool_ids))
        return list(answer.missing)

    async def invoke(agent: dict[str, Any], step: Step, arguments: dict[str, Any], task_id: str) -> tuple[Any, int]:
        request = integrator_pb2.InvokeToolRequest(
            tool_id=step.tool,
            arguments_json=dump_json(arguments),
            agent_id=agent["id"],
            bound_tool_ids=agent.get("tools", []),
            task_id=task_id,
            step_id=step.id,
        )
        # The integrator retries within its own deadline; allow it that long plus the hop.
        answer = await integrator.call("InvokeTool", request, timeout=settings.call_deadline_seconds + 5)
        return load_json(answer.output_json, "output"), answer.http_status

    store = TenantStore(backend, "agent")
    agents = AgentCatalog(store, missing_tools)
    tasks = TaskRunner(store, agents, missing_tools, invoke)
    stack.push_async_callback(tasks.aclose)  # before the store and channel close (the stack unwinds in reverse)
    servicer = AgentServicer(agents, tasks)
    return [
        GrpcService(
            agent_pb2_grpc.add_AgentServiceServicer_to_server, servicer, "altan.v1.AgentService", ready=backend.ping
        )
    ]


if __name__ == "__main__":
    run_service("agent", lambda s: s.agent_port, wire)
