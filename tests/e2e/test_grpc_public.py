"""The gateway's public gRPC port: typed API, allow-list, reflection and health; and every service's own port."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from altan.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    integrator_pb2,
    integrator_pb2_grpc,
    runtime_pb2,
    tool_pb2,
    tool_pb2_grpc,
)
from tests.e2e.stack import Stack

PUBLIC = {"altan.v1.AgentService", "altan.v1.ToolService", "altan.v1.IntegratorService"}


def _metadata(stack: Stack, tenant: str, role: str = "admin") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {stack.token(tenant, role)}"),)


def test_public_grpc_serves_the_typed_api(stack: Stack, tenant: str) -> None:
    metadata = _metadata(stack, tenant)
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        created = agents.CreateAgent(
            agent_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name="via-grpc", tools=["json_extract"])),
            metadata=metadata,
            timeout=10,
        ).agent
        assert created.id.startswith("agt_") and created.HasField("created_at")
        plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"k": "v"}, "path": "k"}}]}
        submitted = agents.SubmitTask(
            agent_pb2.SubmitTaskRequest(agent_id=created.id, input_json=json.dumps(plan).encode()),
            metadata=metadata,
            timeout=10,
        )
        assert submitted.status == agent_pb2.TASK_STATUS_QUEUED and submitted.created
        events = [
            answer.event
            for answer in agents.StreamTaskEvents(
                agent_pb2.StreamTaskEventsRequest(task_id=submitted.task_id), metadata=metadata, timeout=10
            )
        ]
        assert events[-1].type == "task.succeeded"
        finished = [e for e in events if e.type == "tool.finished"]
        assert [(e.step_id, e.tool, e.status) for e in finished] == [
            ("s1", "json_extract", agent_pb2.STEP_STATUS_SUCCEEDED)
        ]
        task = agents.GetTask(agent_pb2.GetTaskRequest(task_id=submitted.task_id), metadata=metadata, timeout=10).task
        assert task.status == agent_pb2.TASK_STATUS_SUCCEEDED
        assert json.loads(task.result_json) == {"s1": {"value": "v", "found": True}}
        assert task.usage.tool_calls == 1 and task.steps[0].HasField("finished_at")

        tools = tool_pb2_grpc.ToolServiceStub(channel)
        listed = tools.ListTools(tool_pb2.ListToolsRequest(), metadata=metadata, timeout=10).tools
        extract = next(t for t in listed if t.tool_id == "json_extract")
        assert extract.type == tool_pb2.TOOL_TYPE_BUILTIN
        assert extract.input_schema["type"] == "object"  # a Struct, not a JSON string

        invoked = integrator_pb2_grpc.IntegratorServiceStub(channel).InvokeTool(
            integrator_pb2.InvokeToolRequest(tool_id="json_extract", arguments_json=b'{"data": [1, 2], "path": "[1]"}'),
            metadata=metadata,
            timeout=10,
        )
        assert json.loads(invoked.output_json) == {"value": 2, "found": True}

        with pytest.raises(grpc.RpcError) as err:
            agents.ListAgents(agent_pb2.ListAgentsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            agents.GetAgent(agent_pb2.GetAgentRequest(agent_id="agt_nope"), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "method",
    [
        "/altan.v1.ToolRuntimeService/ExecuteTool",  # carries a credential
        "/altan.v1.IntegratorRuntimeService/RunTool",  # takes the agent, task and bound tools from its caller
        "/altan.v1.IntegratorRuntimeService/DescribeTools",
        "/altan.v1.AgentService/NoSuchMethod",
    ],
)
def test_internal_rpcs_are_not_public(stack: Stack, tenant: str, method: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        call = channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", metadata=_metadata(stack, tenant), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_tenant_cannot_forge_the_platforms_fields(stack: Stack, tenant: str) -> None:
    """Public InvokeTool used to take agent_id, bound_tool_ids, task_id and step_id from its caller: a tenant could
    write entries into its tasks' audit trail and step around an agent's binding. Those fields now live only on the
    internal RunTool; sent to the public port anyway, they are unknown fields and change nothing."""
    forged = runtime_pb2.RunToolRequest(
        tool_id="json_extract",
        arguments_json=b'{"data": 1, "path": "$"}',
        agent_id="agt_forged",
        bound_tool_ids=["json_extract"],
        task_id="tsk_forged",
        step_id="s1",
    ).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        invoke = channel.unary_unary("/altan.v1.IntegratorService/InvokeTool")
        answer = integrator_pb2.InvokeToolResponse.FromString(
            invoke(forged, metadata=_metadata(stack, tenant), timeout=10)
        )
    assert json.loads(answer.output_json) == {"value": 1, "found": True}
    with stack.client(tenant) as api:
        events = api.get("/v1/audit").json()["events"]
        assert [(e["tool_id"], e["task_id"]) for e in events] == [("json_extract", None)]
        assert api.get("/v1/audit", params={"task_id": "tsk_forged"}).json() == {"events": []}


def test_reflection_alone_is_enough_to_use_the_public_port(stack: Stack, tenant: str) -> None:
    """As grpcurl does: list the services, fetch their descriptors, build messages from them, call, read JSON."""
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        def ask(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
            return next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=10)))

        listed = {
            s.name for s in ask(reflection_pb2.ServerReflectionRequest(list_services="")).list_services_response.service
        }
        assert listed == PUBLIC | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}

        pool = descriptor_pool.DescriptorPool()  # nothing from this project: only what the server sends
        for service in sorted(PUBLIC):
            answer = ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
            files = [
                descriptor_pb2.FileDescriptorProto.FromString(raw)
                for raw in answer.file_descriptor_response.file_descriptor_proto
            ]
            pending = {f.name: f for f in files}
            while pending:  # add each file after the files it imports
                for name, file in list(pending.items()):
                    if all(dep not in pending for dep in file.dependency):
                        try:
                            pool.FindFileByName(name)
                        except KeyError:
                            pool.Add(file)
                        del pending[name]

        def call(service: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
            descriptor = pool.FindServiceByName(service).FindMethodByName(method)
            request_class = message_factory.GetMessageClass(descriptor.input_type)
            response_class = message_factory.GetMessageClass(descriptor.output_type)
            rpc = channel.unary_unary(
                f"/{service}/{method}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_class.FromString,
            )
            request = json_format.ParseDict(body, request_class())
            answer = rpc(request, metadata=_metadata(stack, tenant), timeout=10)
            return json_format.MessageToDict(answer, preserving_proto_field_name=True)

        created = call(
            "altan.v1.AgentService",
            "CreateAgent",
            {
                "agent": {
                    "name": "from-reflection",
                    "tools": ["json_extract"],
                    "llm": {
                        "llm_id": "gpt-4o",
                        "provider": "LLM_PROVIDER_OPENAI",
                        "endpoint": "https://api.openai.com/v1/chat/completions",
                        "parameters": {"temperature": 0.2},
                    },
                }
            },
        )["agent"]
        assert created["name"] == "from-reflection" and created["llm"]["provider"] == "LLM_PROVIDER_OPENAI"
        assert created["llm"]["parameters"] == {"temperature": 0.2}
        tool = call("altan.v1.ToolService", "GetTool", {"tool_id": "json_extract"})["tool"]
        assert tool["type"] == "TOOL_TYPE_BUILTIN" and tool["input_schema"]["required"] == ["data", "path"]
        # Not listed, and not described either: reflection knows only the public files.
        hidden = ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol="altan.v1.ToolRuntimeService"))
        assert hidden.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert not hidden.file_descriptor_response.file_descriptor_proto


def test_health_answers_for_each_public_service(stack: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ["", *sorted(PUBLIC)]:
            answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="altan.v1.ToolRuntimeService"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_public_message_larger_than_a_rest_body_is_refused(stack: Stack, tenant: str) -> None:
    big = agent_pb2.Agent(name="x", instructions="y" * (80 * 1024))  # the stack's body limit is 64 KiB
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            agent_pb2_grpc.AgentServiceStub(channel).CreateAgent(
                agent_pb2.CreateAgentRequest(agent=big), metadata=_metadata(stack, tenant), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("service", ["gateway", "agent", "tool", "integrator"])
def test_health_and_reflection_on_every_port(stack: Stack, service: str) -> None:
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
        expected = {
            "gateway": PUBLIC,
            "agent": {"altan.v1.AgentService"},
            "tool": {"altan.v1.ToolService", "altan.v1.ToolRuntimeService"},
            "integrator": {"altan.v1.IntegratorService", "altan.v1.IntegratorRuntimeService"},
        }[service]
        assert expected <= names


def test_a_string_that_is_not_unicode_is_refused_and_nothing_is_stored(stack: Stack, tenant: str) -> None:
    """A tool created through public gRPC with a lone surrogate in its name used to be stored (the call answered
    INTERNAL), and from then on the tenant's GET /v1/tools was a 500."""
    valid = tool_pb2.CreateToolRequest(
        tool=tool_pb2.Tool(tool_id="surrogate", name="NAME", endpoint="https://example.com/x")
    ).SerializeToString()
    broken = valid.replace(b"NAME", b"\xed\xa0\x80N")  # a UTF-16 surrogate encoded as if it were UTF-8
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        create = channel.unary_unary("/altan.v1.ToolService/CreateTool")
        with pytest.raises(grpc.RpcError) as err:
            create(broken, metadata=_metadata(stack, tenant), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "the request is not a valid message for /altan.v1.ToolService/CreateTool"
    with stack.client(tenant) as api:
        listed = api.get("/v1/tools")
        assert listed.status_code == 200
        assert "surrogate" not in [t["tool_id"] for t in listed.json()["tools"]]
        assert api.get("/v1/tools/surrogate").status_code == 404
