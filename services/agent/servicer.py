"""gRPC face of the Agent Service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from altan.v1 import agent_pb2, agent_pb2_grpc
from altan.wire import dump_json, load_json, paginate
from services.agent.agents import AgentCatalog
from services.agent.tasks import TaskRunner

__all__ = ["AgentServicer"]


def _agent(agent: dict[str, Any]) -> agent_pb2.Agent:
    return agent_pb2.Agent(
        id=agent["id"],
        name=agent["name"],
        instructions=agent.get("instructions", ""),
        llm_json=dump_json(agent["llm"]) if agent.get("llm") else "",
        fallback_llms_json=dump_json(agent.get("fallback_llms", [])),
        tools=agent.get("tools", []),
        created_at=agent["created_at"],
        updated_at=agent["updated_at"],
    )


def _json_or_empty(value: Any) -> str:
    return "" if value is None else dump_json(value)


def _task(task: dict[str, Any]) -> agent_pb2.Task:
    return agent_pb2.Task(
        task_id=task["task_id"],
        agent_id=task["agent_id"],
        status=task["status"],
        input_json=dump_json(task["input"]),
        result_json=_json_or_empty(task.get("result")),
        steps=[
            agent_pb2.Step(
                id=s["id"],
                tool=s["tool"],
                status=s["status"],
                started_at=s.get("started_at") or "",
                finished_at=s.get("finished_at") or "",
                duration_ms=s.get("duration_ms") or 0,
                output_json=_json_or_empty(s.get("output")),
                error=s.get("error") or "",
            )
            for s in task["steps"]
        ],
        error=task.get("error") or "",
        usage_json=dump_json(task.get("usage", {})),
        created_at=task["created_at"],
        updated_at=task["updated_at"],
    )


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, agents: AgentCatalog, tasks: TaskRunner) -> None:
        self._agents = agents
        self._tasks = tasks

    async def CreateAgent(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        agent = await self._agents.create(load_json(request.spec_json, "agent"))
        return agent_pb2.CreateAgentResponse(agent=_agent(agent))

    async def GetAgent(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return agent_pb2.GetAgentResponse(agent=_agent(await self._agents.get(request.agent_id)))

    async def ListAgents(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        agents = await self._agents.all()
        page, token = paginate(agents, request.page_size, request.page_token, default=50, maximum=500)
        return agent_pb2.ListAgentsResponse(agents=[_agent(a) for a in page], next_page_token=token)

    async def UpdateAgent(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        agent = await self._agents.update(request.agent_id, load_json(request.patch_json, "agent"))
        return agent_pb2.UpdateAgentResponse(agent=_agent(agent))

    async def DeleteAgent(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._agents.delete(request.agent_id)
        return agent_pb2.DeleteAgentResponse()

    async def SubmitTask(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        task, created = await self._tasks.submit(
            request.agent_id, load_json(request.input_json, "input"), request.idempotency_key
        )
        return agent_pb2.SubmitTaskResponse(task_id=task["task_id"], status=task["status"], created=created)

    async def GetTask(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return agent_pb2.GetTaskResponse(task=_task(await self._tasks.get(request.task_id)))

    async def StreamTaskEvents(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for seq, event in self._tasks.events(request.task_id, request.after_seq):
            yield agent_pb2.StreamTaskEventsResponse(
                seq=seq,
                type=event["type"],
                task_id=event["task_id"],
                time=event["time"],
                data_json=dump_json(event.get("data", {})),
            )

    async def CancelTask(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return agent_pb2.CancelTaskResponse(task=_task(await self._tasks.cancel(request.task_id)))
