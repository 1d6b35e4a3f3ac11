"""REST and public gRPC validate alike: the same good and bad inputs through both ports, the same outcome.

Each case is written twice, as a REST body and as the typed proto a gRPC client would build; the outcome is the HTTP
status and error message on one side, and the status code (through API.md's mapping) and details on the other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from altan.errors import http_status_for
from altan.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    integrator_pb2,
    integrator_pb2_grpc,
    tool_pb2,
    tool_pb2_grpc,
)
from tests.e2e.stack import Stack

PLAN = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": 1}, "path": "a"}}]}
LLM = {"llm_id": "gpt-4o", "provider": "openai", "endpoint": "https://api.openai.com/v1/chat/completions"}


def llm_pb(**changes: Any) -> agent_pb2.LlmConfig:
    fields: dict[str, Any] = {
        "llm_id": "gpt-4o",
        "provider": agent_pb2.LLM_PROVIDER_OPENAI,
        "endpoint": "https://api.openai.com/v1/chat/completions",
    }
    return agent_pb2.LlmConfig(**(fields | changes))


@dataclass
class Ports:
    """One tenant on both ports, with an agent to submit tasks to."""

    rest: httpx.Client
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]
    agent_id: str

    @property
    def agents(self) -> agent_pb2_grpc.AgentServiceStub:
        return agent_pb2_grpc.AgentServiceStub(self.channel)

    @property
    def tools(self) -> tool_pb2_grpc.ToolServiceStub:
        return tool_pb2_grpc.ToolServiceStub(self.channel)

    @property
    def integrator(self) -> integrator_pb2_grpc.IntegratorServiceStub:
        return integrator_pb2_grpc.IntegratorServiceStub(self.channel)


@dataclass(frozen=True)
class Case:
    """The same call on both ports; ``tag`` makes names unique per port (creating twice would be a 409)."""

    rest: Callable[[Ports, str], httpx.Response]
    grpc: Callable[[Ports, str], Any]
    status: int  # the outcome both ports must agree on


def _rest_outcome(response: httpx.Response) -> tuple[int, str]:
    if response.status_code >= 400:
        return response.status_code, response.json()["error"]["message"]
    return response.status_code, ""


def _grpc_outcome(call: Callable[[], Any], success: int) -> tuple[int, str]:
    try:
        call()
    except grpc.RpcError as err:
        return http_status_for(err.code()), err.details()
    return success, ""


def _tool_body(tool_id: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "tool_id": tool_id,
        "name": "Lookup",
        "parameters": [{"name": "customer", "type": "string", "required": True}],
        "endpoint": "https://crm.example.com/v1/{customer}",
        "method": "GET",
        "auth": "api_key",
        "credential": "crm",
    }
    return {k: v for k, v in (body | changes).items() if v is not ...}


def _tool_pb(tool_id: str, **changes: Any) -> tool_pb2.Tool:
    fields: dict[str, Any] = {
        "tool_id": tool_id,
        "name": "Lookup",
        "parameters": [tool_pb2.Parameter(name="customer", type=tool_pb2.PARAMETER_TYPE_STRING, required=True)],
        "endpoint": "https://crm.example.com/v1/{customer}",
        "method": tool_pb2.HTTP_METHOD_GET,
        "auth": common_pb2.AUTH_TYPE_API_KEY,
        "credential": "crm",
    }
    return tool_pb2.Tool(**{k: v for k, v in (fields | changes).items() if v is not ...})


def create_agent(rest: dict[str, Any], proto: agent_pb2.Agent, status: int) -> Case:
    return Case(
        lambda p, tag: p.rest.post("/v1/agents", json=rest),
        lambda p, tag: p.agents.CreateAgent(agent_pb2.CreateAgentRequest(agent=proto), metadata=p.metadata, timeout=10),
        status,
    )


def create_tool(rest: Callable[[str], dict[str, Any]], proto: Callable[[str], tool_pb2.Tool], status: int) -> Case:
    return Case(
        lambda p, tag: p.rest.post("/v1/tools", json=rest(f"t_rest_{tag}")),
        lambda p, tag: p.tools.CreateTool(
            tool_pb2.CreateToolRequest(tool=proto(f"t_grpc_{tag}")), metadata=p.metadata, timeout=10
        ),
        status,
    )


def put_credential(name: str, rest: dict[str, Any], proto: integrator_pb2.CredentialSpec, status: int) -> Case:
    return Case(
        lambda p, tag: p.rest.put(f"/v1/credentials/{name}", json=rest),
        lambda p, tag: p.integrator.PutCredential(
            integrator_pb2.PutCredentialRequest(name=name, credential=proto), metadata=p.metadata, timeout=10
        ),
        status,
    )


def submit(rest: dict[str, Any], proto: agent_pb2.SubmitTaskRequest, status: int) -> Case:
    def grpc_call(p: Ports, tag: str) -> Any:
        request = agent_pb2.SubmitTaskRequest()
        request.CopyFrom(proto)
        request.agent_id = p.agent_id
        return p.agents.SubmitTask(request, metadata=p.metadata, timeout=10)

    return Case(lambda p, tag: p.rest.post(f"/v1/agents/{p.agent_id}/tasks", json=rest), grpc_call, status)


def decide(task_id: str, call_id: str, approve: bool, comment: str, status: int) -> Case:
    body = {"approve": approve, "comment": comment}
    request = agent_pb2.DecideApprovalRequest(task_id=task_id, call_id=call_id, approve=approve, comment=comment)
    return Case(
        lambda p, tag: p.rest.post(f"/v1/tasks/{task_id}/approvals/{call_id}", json=body),
        lambda p, tag: p.agents.DecideApproval(request, metadata=p.metadata, timeout=10),
        status,
    )


def invoke(tool_id: str, arguments: dict[str, Any], status: int) -> Case:
    return Case(
        lambda p, tag: p.rest.post(f"/v1/tools/{tool_id}/invoke", json={"arguments": arguments}),
        lambda p, tag: p.integrator.InvokeTool(
            integrator_pb2.InvokeToolRequest(tool_id=tool_id, arguments_json=json.dumps(arguments).encode()),
            metadata=p.metadata,
            timeout=10,
        ),
        status,
    )


def update_agent(rest: dict[str, Any], proto: agent_pb2.Agent, paths: list[str], status: int) -> Case:
    return Case(
        lambda p, tag: p.rest.patch(f"/v1/agents/{p.agent_id}", json=rest),
        lambda p, tag: p.agents.UpdateAgent(
            agent_pb2.UpdateAgentRequest(agent_id=p.agent_id, agent=proto, update_mask=FieldMask(paths=paths)),
            metadata=p.metadata,
            timeout=10,
        ),
        status,
    )


api_key = integrator_pb2.ApiKeySpec
CASES: dict[str, Case] = {
    # agents
    "agent ok": create_agent(
        {"name": "a", "tools": ["json_extract"], "llm": LLM},
        agent_pb2.Agent(name="a", tools=["json_extract"], llm=llm_pb()),
        201,
    ),
    "agent without name": create_agent({"tools": []}, agent_pb2.Agent(), 400),
    "agent name too long": create_agent({"name": "n" * 201}, agent_pb2.Agent(name="n" * 201), 400),
    "agent tool listed twice": create_agent(
        {"name": "a", "tools": ["json_extract"] * 2}, agent_pb2.Agent(name="a", tools=["json_extract"] * 2), 400
    ),
    "agent unknown tool": create_agent(
        {"name": "a", "tools": ["nope"]}, agent_pb2.Agent(name="a", tools=["nope"]), 400
    ),
    "agent bad endpoint": create_agent(
        {"name": "a", "llm": LLM | {"endpoint": "ftp://x"}},
        agent_pb2.Agent(name="a", llm=llm_pb(endpoint="ftp://x")),
        400,
    ),
    "agent without provider": create_agent(
        {"name": "a", "llm": {k: v for k, v in LLM.items() if k != "provider"}},
        agent_pb2.Agent(name="a", llm=llm_pb(provider=agent_pb2.LLM_PROVIDER_UNSPECIFIED)),
        400,
    ),
    "agent with an id": create_agent({"name": "a", "id": "agt_mine"}, agent_pb2.Agent(name="a", id="agt_mine"), 400),
    "agent eleven fallbacks": create_agent(
        {"name": "a", "fallback_llms": [LLM] * 11}, agent_pb2.Agent(name="a", fallback_llms=[llm_pb()] * 11), 400
    ),
    "agent auth credential name": create_agent(
        {"name": "a", "llm": LLM | {"auth": {"type": "api_key", "credential": "bad name"}}},
        agent_pb2.Agent(
            name="a", llm=llm_pb(auth=agent_pb2.LlmAuth(type=common_pb2.AUTH_TYPE_API_KEY, credential="bad name"))
        ),
        400,
    ),
    "patch ok": update_agent({"name": "renamed", "llm": None}, agent_pb2.Agent(name="renamed"), ["name", "llm"], 200),
    "patch empty name": update_agent({"name": ""}, agent_pb2.Agent(), ["name"], 400),
    "patch unknown tool": update_agent({"tools": ["nope"]}, agent_pb2.Agent(tools=["nope"]), ["tools"], 400),
    # tools
    "tool ok": create_tool(_tool_body, _tool_pb, 201),
    "tool bad id": create_tool(lambda t: _tool_body("Bad" + t), lambda t: _tool_pb("Bad" + t), 400),
    "tool auth without credential": create_tool(
        lambda t: _tool_body(t, credential=...), lambda t: _tool_pb(t, credential=...), 400
    ),
    "tool undeclared placeholder": create_tool(
        lambda t: _tool_body(t, endpoint="https://x.example/{nope}"),
        lambda t: _tool_pb(t, endpoint="https://x.example/{nope}"),
        400,
    ),
    "tool user in endpoint": create_tool(
        lambda t: _tool_body(t, endpoint="https://u:p@x.example/{customer}"),
        lambda t: _tool_pb(t, endpoint="https://u:p@x.example/{customer}"),
        400,
    ),
    "tool bad parameter default": create_tool(
        lambda t: _tool_body(t, parameters=[{"name": "n", "type": "integer", "default": "x"}], endpoint="https://x/"),
        lambda t: _tool_pb(
            t,
            parameters=[
                tool_pb2.Parameter(name="n", type=tool_pb2.PARAMETER_TYPE_INTEGER, default={"string_value": "x"})
            ],
            endpoint="https://x/",
        ),
        400,
    ),
    "tool schema not an object": create_tool(
        lambda t: _tool_body(t, parameters=..., input_schema={"type": "array"}, endpoint="https://x/"),
        lambda t: _tool_pb(t, parameters=..., input_schema={"type": "array"}, endpoint="https://x/"),
        400,
    ),
    "tool own fallback": create_tool(
        lambda t: _tool_body(t, fallback_tool_id=t), lambda t: _tool_pb(t, fallback_tool_id=t), 400
    ),
    "tool builtin id": create_tool(lambda t: _tool_body("json_extract"), lambda t: _tool_pb("json_extract"), 409),
    # credentials
    "credential ok": put_credential(
        "crm",
        {"type": "api_key", "value": "sk-1", "hosts": ["api.example.com"]},
        integrator_pb2.CredentialSpec(api_key=api_key(value="sk-1"), hosts=["api.example.com"]),
        201,
    ),
    "credential bad header": put_credential(
        "c1",
        {"type": "api_key", "value": "v", "header": "Bad Header"},
        integrator_pb2.CredentialSpec(api_key=api_key(value="v", header="Bad Header")),
        400,
    ),
    "credential line break": put_credential(
        "c2",
        {"type": "api_key", "value": "v\r\nX-Injected: 1"},
        integrator_pb2.CredentialSpec(api_key=api_key(value="v\r\nX-Injected: 1")),
        400,
    ),
    "credential without kind": put_credential("c3", {"hosts": []}, integrator_pb2.CredentialSpec(), 400),
    "credential oauth2 without token url": put_credential(
        "c4",
        {
            "type": "oauth2",
            "client_id": "c",
            "client_secret": "s",
            "authorize_url": "https://a.example/auth",
            "redirect_uri": "https://me.example/cb",
        },
        integrator_pb2.CredentialSpec(
            oauth2=integrator_pb2.OAuth2Spec(
                client_id="c",
                client_secret="s",
                authorize_url="https://a.example/auth",
                redirect_uri="https://me.example/cb",
            )
        ),
        400,
    ),
    "credential bad host": put_credential(
        "c5",
        {"type": "api_key", "value": "v", "hosts": ["a b"]},
        integrator_pb2.CredentialSpec(api_key=api_key(value="v"), hosts=["a b"]),
        400,
    ),
    "credential bad name": put_credential(
        "bad name", {"type": "api_key", "value": "v"}, integrator_pb2.CredentialSpec(api_key=api_key(value="v")), 400
    ),
    # tasks
    "task ok": submit({"input": PLAN}, agent_pb2.SubmitTaskRequest(input_json=json.dumps(PLAN).encode()), 202),
    "task without input": submit({}, agent_pb2.SubmitTaskRequest(), 400),
    "task unknown tool": submit(
        {"input": {"plan": [{"id": "s1", "tool": "nope"}]}},
        agent_pb2.SubmitTaskRequest(input_json=b'{"plan": [{"id": "s1", "tool": "nope"}]}'),
        400,
    ),
    "task cycle": submit(
        {"input": {"plan": [{"id": "a", "tool": "json_extract", "depends_on": ["a"]}]}},
        agent_pb2.SubmitTaskRequest(input_json=b'{"plan": [{"id": "a", "tool": "json_extract", "depends_on": ["a"]}]}'),
        400,
    ),
    "task long idempotency key": submit(
        {"input": PLAN, "idempotency_key": "k" * 201},
        agent_pb2.SubmitTaskRequest(input_json=json.dumps(PLAN).encode(), idempotency_key="k" * 201),
        400,
    ),
    "task bad thread id": submit(
        {"input": PLAN, "thread_id": "a b"},
        agent_pb2.SubmitTaskRequest(input_json=json.dumps(PLAN).encode(), thread_id="a b"),
        400,
    ),
    # approvals
    "approval of an unknown task": decide("tsk_missing", "s1", True, "", 404),
    "approval comment too long": decide("tsk_missing", "s1", False, "c" * 2001, 400),
    # invocations
    "invoke ok": invoke("json_extract", {"data": [1, 2], "path": "[0]"}, 200),
    "invoke bad arguments": invoke("json_extract", {"data": 1}, 400),
    "invoke unknown tool": invoke("nope", {}, 404),
}


@pytest.fixture
def ports(stack: Stack, tenant: str) -> Any:
    with stack.client(tenant) as rest, grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        agent = rest.post("/v1/agents", json={"name": "parity", "tools": ["json_extract"]})
        assert agent.status_code == 201, agent.text
        yield Ports(rest, channel, (("authorization", f"Bearer {stack.token(tenant)}"),), agent.json()["id"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_ports_agree(ports: Ports, name: str) -> None:
    case = CASES[name]
    tag = uuid.uuid4().hex[:8]
    rest = _rest_outcome(case.rest(ports, tag))
    via_grpc = _grpc_outcome(lambda: case.grpc(ports, tag), case.status)
    assert rest == via_grpc
    assert rest[0] == case.status, rest


def test_a_member_is_refused_alike(stack: Stack, tenant: str) -> None:
    with stack.client(tenant, role="member") as rest, grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as ch:
        metadata = (("authorization", f"Bearer {stack.token(tenant, 'member')}"),)
        answer = rest.post("/v1/tools", json=_tool_body("mine"))
        outcome = _grpc_outcome(
            lambda: tool_pb2_grpc.ToolServiceStub(ch).CreateTool(
                tool_pb2.CreateToolRequest(tool=_tool_pb("mine")), metadata=metadata, timeout=10
            ),
            201,
        )
        assert _rest_outcome(answer) == outcome == (403, "creating a tool requires the admin role")


def test_a_tool_is_the_same_resource_on_both_ports(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as rest, grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        metadata = (("authorization", f"Bearer {stack.token(tenant)}"),)
        created = rest.post("/v1/tools", json=_tool_body("via_rest")).json()
        tool_pb2_grpc.ToolServiceStub(channel).CreateTool(
            tool_pb2.CreateToolRequest(tool=_tool_pb("via_grpc")), metadata=metadata, timeout=10
        )
        read = rest.get("/v1/tools/via_grpc").json()
    drop = {"tool_id", "created_at"}
    assert {k: v for k, v in created.items() if k not in drop} == {k: v for k, v in read.items() if k not in drop}
