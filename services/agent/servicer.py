"""gRPC face of the Agent Service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from opentelemetry import trace

from altan import telemetry
from altan.api.agents import agent_spec_from_proto, agent_to_proto, patch_from_proto
from altan.api.tasks import (
    event_to_proto,
    parse_decision,
    parse_submission,
    task_status_value,
    task_to_proto,
    thread_to_proto,
)
from altan.server import Context
from altan.v1 import agent_pb2, agent_pb2_grpc
from altan.wire import paginate, parse_json
from services.agent.agents import AgentCatalog
from services.agent.tasks import TaskRunner

__all__ = ["AgentServicer"]


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, agents: AgentCatalog, tasks: TaskRunner) -> None:
        self._agents = agents
        self._tasks = tasks

    async def CreateAgent(
        self, request: agent_pb2.CreateAgentRequest, context: Context
    ) -> agent_pb2.CreateAgentResponse:
        agent = await self._agents.create(agent_spec_from_proto(request.agent))
        return agent_pb2.CreateAgentResponse(agent=agent_to_proto(agent))

    async def GetAgent(self, request: agent_pb2.GetAgentRequest, context: Context) -> agent_pb2.GetAgentResponse:
        return agent_pb2.GetAgentResponse(agent=agent_to_proto(await self._agents.get(request.agent_id)))

    async def ListAgents(self, request: agent_pb2.ListAgentsRequest, context: Context) -> agent_pb2.ListAgentsResponse:
        agents = await self._agents.all()
        page, token = paginate(agents, request.page_size, request.page_token, default=50, maximum=500)
        return agent_pb2.ListAgentsResponse(agents=[agent_to_proto(a) for a in page], next_page_token=token)

    async def UpdateAgent(
        self, request: agent_pb2.UpdateAgentRequest, context: Context
    ) -> agent_pb2.UpdateAgentResponse:
        changes = patch_from_proto(request.agent, request.update_mask)
        return agent_pb2.UpdateAgentResponse(agent=agent_to_proto(await self._agents.update(request.agent_id, changes)))

    async def DeleteAgent(
        self, request: agent_pb2.DeleteAgentRequest, context: Context
    ) -> agent_pb2.DeleteAgentResponse:
        await self._agents.delete(request.agent_id)
        return agent_pb2.DeleteAgentResponse()

    async def SubmitTask(self, request: agent_pb2.SubmitTaskRequest, context: Context) -> agent_pb2.SubmitTaskResponse:
        body: dict[str, Any] = {}
        if request.input_json:
            body["input"] = parse_json(request.input_json, "input")
        if request.idempotency_key:
            body["idempotency_key"] = request.idempotency_key
        if request.thread_id:
            body["thread_id"] = request.thread_id
        submission = parse_submission(body)
        task, created = await self._tasks.submit(request.agent_id, submission)
        telemetry.set_attributes(trace.get_current_span(), {telemetry.TASK: task["task_id"]})
        return agent_pb2.SubmitTaskResponse(
            task_id=task["task_id"],
            status=task_status_value(task["status"]),  # type: ignore[arg-type]
            created=created,
            thread_id=task.get("thread_id") or "",
        )

    async def GetTask(self, request: agent_pb2.GetTaskRequest, context: Context) -> agent_pb2.GetTaskResponse:
        return agent_pb2.GetTaskResponse(task=task_to_proto(await self._tasks.get(request.task_id)))

    async def StreamTaskEvents(
        self, request: agent_pb2.StreamTaskEventsRequest, context: Context
    ) -> AsyncIterator[agent_pb2.StreamTaskEventsResponse]:
        async for seq, event in self._tasks.events(request.task_id, request.after_seq):
            yield agent_pb2.StreamTaskEventsResponse(event=event_to_proto(seq, event))

    async def GetThread(self, request: agent_pb2.GetThreadRequest, context: Context) -> agent_pb2.GetThreadResponse:
        thread, messages, token = await self._tasks.thread(request.thread_id, request.page_size, request.page_token)
        return agent_pb2.GetThreadResponse(thread=thread_to_proto(thread, messages), next_page_token=token)

    async def DecideApproval(
        self, request: agent_pb2.DecideApprovalRequest, context: Context
    ) -> agent_pb2.DecideApprovalResponse:
        decision = parse_decision({"approve": request.approve, "comment": request.comment})
        task = await self._tasks.decide(request.task_id, request.call_id, decision.approve, decision.comment)
        return agent_pb2.DecideApprovalResponse(task=task_to_proto(task))

    async def CancelTask(self, request: agent_pb2.CancelTaskRequest, context: Context) -> agent_pb2.CancelTaskResponse:
        return agent_pb2.CancelTaskResponse(task=task_to_proto(await self._tasks.cancel(request.task_id)))
