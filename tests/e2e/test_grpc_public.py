"""The gateway's public gRPC port, and health and reflection on every service."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from altan.v1 import agent_pb2, agent_pb2_grpc, tool_pb2, tool_pb2_grpc
from tests.e2e.stack import Stack


def test_public_grpc_serves_the_same_api(stack: Stack, tenant: str) -> None:
    metadata = (("authorization", f"Bearer {stack.token(tenant)}"),)
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        created = agents.CreateAgent(
            agent_pb2.CreateAgentRequest(spec_json=json.dumps({"name": "via-grpc", "tools": ["json_extract"]})),
            metadata=metadata,
            timeout=10,
        ).agent
        plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"k": "v"}, "path": "k"}}]}
        submitted = agents.SubmitTask(
            agent_pb2.SubmitTaskRequest(agent_id=created.id, input_json=json.dumps(plan)), metadata=metadata, timeout=10
        )
        events = list(
            agents.StreamTaskEvents(
                agent_pb2.StreamTaskEventsRequest(task_id=submitted.task_id), metadata=metadata, timeout=10
            )
        )
        assert events[-1].type == "task.succeeded"
        task = agents.GetTask(agent_pb2.GetTaskRequest(task_id=submitted.task_id), metadata=metadata, timeout=10).task
        assert json.loads(task.result_json) == {"s1": {"value": "v", "found": True}}

        tools = tool_pb2_grpc.ToolServiceStub(channel)
        assert "json_extract" in [
            t.tool_id for t in tools.ListTools(tool_pb2.ListToolsRequest(), metadata=metadata).tools
        ]
        # The internal RPC that carries credentials is not public.
        with pytest.raises(grpc.RpcError) as err:
            tools.ExecuteTool(tool_pb2.ExecuteToolRequest(tool_id="json_extract"), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            agents.ListAgents(agent_pb2.ListAgentsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            agents.GetAgent(agent_pb2.GetAgentRequest(agent_id="agt_nope"), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("service", ["gateway", "agent", "tool", "integrator"])
def test_health_and_reflection(stack: Stack, service: str) -> None:
    port = stack.grpc_port if service == "gateway" else stack.internal_ports[service]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert "grpc.health.v1.Health" in names
        if service != "gateway":
            assert f"altan.v1.{service.capitalize()}Service" in names
