"""Tool containers end to end: `altan serve-tools` processes and a stack that finds them through
ALTAN_TOOL_CONTAINERS; their tools listed, invoked, in plans and in the agent loop, as a tenant sees them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from altan.v1 import container_pb2, container_pb2_grpc
from tests.e2e.conftest import McpServers
from tests.e2e.fake_llms import Llms
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import DELEGATION_PUBLIC_KEYS, JWT_SECRET, Stack, free_port, new_tenant, start_stack
from tests.e2e.test_durable_tasks import _terminal
from tests.e2e.test_tasks import _finished
from tests.fakes.llm import Call, Reply
from tests.fakes.slack import FakeSlack, start_fake_slack

ROOT = Path(__file__).resolve().parents[2]

WHOAMI = '''
from altan.sdk import ToolContext, tool

@tool
def whoami(ctx: ToolContext) -> dict:
    """Who called."""
    return {"tenant": ctx.tenant_id, "user": ctx.user, "role": ctx.role}
'''


@dataclass
class Container:
    process: subprocess.Popen[str]
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def serve_tools(module: Path, port: int, **extra_env: str) -> Container:
    """`altan serve-tools module --port port`, returned once its gRPC health check answers SERVING."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTAN_")}
    env.update(
        ALTAN_JWT_SECRET=JWT_SECRET,
        ALTAN_DELEGATION_PUBLIC_KEYS_FILE=str(DELEGATION_PUBLIC_KEYS),  # public only: a container never signs
        PYTHONUNBUFFERED="1",
        **extra_env,
    )
    command = [sys.executable, "-m", "altan.cli", "serve-tools", str(module), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    container = Container(process, port)
    with grpc.insecure_channel(container.address) as channel:
        request = health_pb2.HealthCheckRequest(service="altan.v1.ToolContainerService")
        # wait_for_ready: the call waits (up to its deadline) until the port accepts, instead of polling.
        answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=30, wait_for_ready=True)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    return container


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Ask again until ``condition`` holds (the tool service re-lists containers every second here)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def weather() -> Iterator[Container]:
    container = serve_tools(ROOT / "examples" / "weather.py", free_port())
    yield container
    assert container.stop() == 0


SLACK_TOKEN = "xoxb-e2e-slack-token-5d1e"
LEAKED = "leaky-e2e-secret-93be"

# A careless tool container: it returns, raises and logs the secret it was given. None of it may reach a tenant's
# output, task, event or audit, or the stack's logs.
LEAKY = """
from altan.sdk import ToolContext, ToolError, tool

@tool(credential="leaky-key")
def leak(ctx: ToolContext, how: str = "output") -> dict:
    \"\"\"Leaks its credential.\"\"\"
    value = ctx.credential.value
    if how == "error":
        raise ToolError(f"refused with {value}")
    if how == "crash":
        raise RuntimeError(f"crashed with {value}")
    return {"echo": value, value: "as a key", "headers": dict(ctx.credential.headers)}

@tool
def no_secret(ctx: ToolContext) -> dict:
    \"\"\"Declares no credential.\"\"\"
    return {"credential": repr(ctx.credential)}
"""


@pytest.fixture(scope="module")
def slack() -> Iterator[FakeSlack]:
    fake = start_fake_slack(SLACK_TOKEN)
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def notifier(slack: FakeSlack) -> Iterator[Container]:
    container = serve_tools(ROOT / "examples" / "slack_notifier.py", free_port(), SLACK_API_URL=slack.api_url)
    yield container
    assert container.stop() == 0


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    module = tmp_path_factory.mktemp("leaky") / "leaky.py"
    module.write_text(LEAKY)
    container = serve_tools(module, free_port())
    yield container
    assert container.stop() == 0


# The idempotency keys of its calls, noted per name: a step resumed after a crash must send its first call's key.
REMEMBER = """
import asyncio

from altan.sdk import ToolContext, tool

NOTED: dict[str, list[str]] = {}

@tool
async def remember(ctx: ToolContext, name: str, seconds: float = 0, note: bool = True) -> list[str]:
    \"\"\"Notes the call's idempotency key under name (unless note is false), waits, answers the keys noted.\"\"\"
    if note:
        NOTED.setdefault(name, []).append(ctx.idempotency_key)
    await asyncio.sleep(seconds)
    return NOTED.get(name, [])
"""


@pytest.fixture(scope="module")
def keeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    module = tmp_path_factory.mktemp("keeper") / "keeper.py"
    module.write_text(REMEMBER)
    container = serve_tools(module, free_port())
    yield container
    assert container.stop() == 0


@pytest.fixture(scope="module")
def spare_port() -> int:
    """A container the stack is told about, started (and stopped) by a test."""
    return free_port()


@pytest.fixture(scope="module")
def stack(
    weather: Container,
    notifier: Container,
    leaky: Container,
    keeper: Container,
    spare_port: int,
    third_party: FakeThirdParty,
    llms: Llms,
    mcp_servers: McpServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    containers = f"{weather.address},{notifier.address},{leaky.address},{keeper.address},127.0.0.1:{spare_port}"
    allow = f"127.0.0.1:{third_party.port},127.0.0.1:{llms.openai.port},127.0.0.1:{mcp_servers.port}"
    env = {"ALTAN_TOOL_CONTAINERS": containers, "ALTAN_TOOL_CONTAINERS_REFRESH_SECONDS": "1"}
    running = start_stack(
        data_dir=tmp_path_factory.mktemp("data-containers"), egress_allow=allow, redis_url=None, extra_env=env
    )
    yield running
    assert running.stop() == 0, running.logs()[-5000:]


def _tools(api: Any) -> dict[str, dict[str, Any]]:
    answer = api.get("/v1/tools")
    assert answer.status_code == 200, answer.text
    return {t["tool_id"]: t for t in answer.json()["tools"]}


def test_container_tools_are_in_every_tenants_catalogue(stack: Stack, tenant: str) -> None:
    for who in (tenant, new_tenant()):
        with stack.client(who, role="member") as api:
            tools = _tools(api)
            forecast = tools["forecast"]
            assert forecast["type"] == "container" and forecast["description"] == "Forecast for a city."
            assert forecast["input_schema"]["required"] == ["city"]
            assert forecast["input_schema"]["properties"]["days"]["default"] == 1
            assert tools["slack_notify"]["type"] == "container"
            assert tools["slack_notify"]["credential"] == "slack"  # what a tenant's admin is asked to grant
            assert "credential" not in forecast
            assert "container" not in forecast and "revision" not in forecast  # where it runs is not the tenant's
            assert api.get("/v1/tools/forecast").json() == forecast
    listed = list(tools)
    assert listed.index("http_request") < listed.index("forecast")  # built-ins first, then container tools


def test_a_container_tool_is_invoked_as_any_tool_and_audited(stack: Stack, tenant: str, weather: Container) -> None:
    with stack.client(tenant, role="member") as api:
        answer = api.post("/v1/tools/forecast/invoke", json={"arguments": {"city": "Paris", "days": 3}})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"output": {"city": "Paris", "days": 3}}
        refused = api.post("/v1/tools/forecast/invoke", json={"arguments": {"days": 3}})
        assert refused.status_code == 400
        assert refused.json()["error"] == {"code": "INVALID_ARGUMENT", "message": "city: required"}
        events = api.get("/v1/audit").json()["events"]
    assert [(e["tool_id"], e["outcome"]) for e in events] == [("forecast", "ok"), ("forecast", "error")]
    assert events[0]["target"] == weather.address and events[0]["user"] == "alice"


def test_a_custom_tool_may_not_take_a_container_tools_id(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        spec = {"tool_id": "forecast", "name": "Mine", "endpoint": "https://api.example.com/x"}
        answer = api.post("/v1/tools", json=spec)
        assert answer.status_code == 409 and "tool container" in answer.json()["error"]["message"]
        assert api.delete("/v1/tools/forecast").status_code == 403


def test_container_tools_run_in_parallel_plan_steps(stack: Stack, tenant: str) -> None:
    plan = [
        {"id": "s1", "tool": "forecast", "arguments": {"city": "Oslo", "days": 2}},
        {"id": "s2", "tool": "forecast", "arguments": {"city": "Rome"}},
        {
            "id": "s3",
            "tool": "text_template",
            "depends_on": ["s1", "s2"],
            "arguments": {
                "template": "{{ a }} for {{ n }} days, {{ b }}",
                "values": {"a": "${s1.output.city}", "n": "${s1.output.days}", "b": "${s2.output.city}"},
            },
        },
    ]
    with stack.client(tenant) as api:
        agent = api.post("/v1/agents", json={"name": "w", "tools": ["forecast", "text_template"]}).json()
        submitted = api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": {"plan": plan}})
        assert submitted.status_code == 202, submitted.text
        task = _finished(api, submitted.json()["task_id"])
    assert task["status"] == "succeeded", task
    assert task["result"]["s3"] == {"text": "Oslo for 2 days, Rome"}


def test_the_agent_loop_calls_a_container_tool(stack: Stack, tenant: str, llms: Llms) -> None:
    model = llms.model(Reply(calls=(Call("forecast", {"city": "Lima", "days": 4}),)), Reply(text="Lima, 4 days."))
    with stack.client(tenant) as api:
        body = {"name": "w", "instructions": "Be brief.", "llm": llms.config(model), "tools": ["forecast"]}
        agent = api.post("/v1/agents", json=body).json()
        submitted = api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": "Weather in Lima?"})
        task = _finished(api, submitted.json()["task_id"])
    assert task["status"] == "succeeded", task
    assert task["result"] == {"answer": "Lima, 4 days."}
    [step] = task["steps"]
    assert step["tool"] == "forecast" and step["output"] == {"city": "Lima", "days": 4}
    first, second = llms.requests(model)
    offered = first.body["tools"][0]["function"]
    assert offered["name"] == "forecast" and offered["parameters"]["required"] == ["city"]
    assert '"city": "Lima"' in second.body["messages"][-1]["content"].replace('":"', '": "')


def test_the_slack_example_posts_with_the_credential_its_admin_granted_and_nothing_else(
    stack: Stack, tenant: str, slack: FakeSlack, llms: Llms
) -> None:
    arguments = {"channel_id": "C0123ABCD", "text": "Deploy done"}
    with stack.client(tenant) as api:
        missing = api.post("/v1/tools/slack_notify/invoke", json={"arguments": arguments})
        assert missing.status_code == 400 and "credential 'slack' not found" in missing.json()["error"]["message"]
        assert api.put("/v1/credentials/slack", json={"type": "api_key", "value": SLACK_TOKEN}).status_code == 201
        ungranted = api.post("/v1/tools/slack_notify/invoke", json={"arguments": arguments})
        assert ungranted.status_code == 403 and "not granted to tool 'slack_notify'" in ungranted.text, ungranted.text
        assert not slack.posted()  # nothing left the integrator: the container was never called

        granted = {"type": "api_key", "value": SLACK_TOKEN, "tools": ["slack_notify"]}
        stored = api.put("/v1/credentials/slack", json=granted)
        assert stored.status_code == 200 and stored.json()["tools"] == ["slack_notify"]
        posted = api.post("/v1/tools/slack_notify/invoke", json={"arguments": {**arguments, "severity": "warning"}})
        assert posted.status_code == 200, posted.text
        assert posted.json()["output"]["channel"] == "C0123ABCD" and posted.json()["output"]["ts"]
        [request] = slack.posted()
        assert request.path == "/api/chat.postMessage" and request.authorization == f"Bearer {SLACK_TOKEN}"
        assert request.body["text"] == ":warning: Deploy done"
        assert request.body["blocks"][1]["elements"][0]["text"] == "sent by alice through Altan"
        refused = api.post("/v1/tools/slack_notify/invoke", json={"arguments": {"channel_id": "X1", "text": "t"}})
        assert refused.status_code == 400  # the schema's pattern, in the container

        plan = [{"id": "s1", "tool": "slack_notify", "arguments": {"channel_id": "C0123ABCD", "text": "From a plan"}}]
        agent = api.post("/v1/agents", json={"name": "n", "tools": ["slack_notify"]}).json()
        task = _finished(
            api, api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": {"plan": plan}}).json()["task_id"]
        )
        assert task["status"] == "succeeded" and task["result"]["s1"]["channel"] == "C0123ABCD", task
        model = llms.model(
            Reply(calls=(Call("slack_notify", {"channel_id": "C0123ABCD", "text": "From the loop"}),)),
            Reply(text="Sent."),
        )
        body = {"name": "l", "instructions": "Notify.", "llm": llms.config(model), "tools": ["slack_notify"]}
        looping = api.post("/v1/agents", json=body).json()
        task = _finished(api, api.post(f"/v1/agents/{looping['id']}/tasks", json={"input": "tell"}).json()["task_id"])
        assert task["status"] == "succeeded" and task["result"] == {"answer": "Sent."}, task
        assert [p.body["text"] for p in slack.posted()[1:]] == [
            ":information_source: From a plan",
            ":information_source: From the loop",
        ]

        audit = api.get("/v1/audit").json()["events"]
        calls = [e for e in audit if e["tool_id"] == "slack_notify"]
        assert calls[0]["outcome"] in ("error", "denied") and calls[1]["outcome"] == "denied"
        assert calls[2]["outcome"] == "ok"
        seen = (
            api.get("/v1/audit").text
            + api.get(f"/v1/tasks/{task['task_id']}/events").text
            + api.get("/v1/credentials").text
        )
        assert SLACK_TOKEN not in seen and SLACK_TOKEN not in str(llms.requests(model))
    with stack.client(new_tenant()) as other:  # another tenant's grant is its own
        assert other.put("/v1/credentials/slack", json={"type": "api_key", "value": "xoxb-other"}).status_code == 201
        assert other.post("/v1/tools/slack_notify/invoke", json={"arguments": arguments}).status_code == 403
    assert SLACK_TOKEN not in stack.logs()


def test_a_secret_a_container_echoes_is_redacted_and_never_sent_unasked(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        key = {"type": "api_key", "value": LEAKED, "tools": ["leak"]}
        assert api.put("/v1/credentials/leaky-key", json=key).status_code == 201
        output = api.post("/v1/tools/leak/invoke", json={"arguments": {}})
        assert output.status_code == 200, output.text
        assert output.json()["output"] == {
            "echo": "[redacted]",
            "[redacted]": "as a key",
            "headers": {"Authorization": "Bearer [redacted]"},
        }
        error = api.post("/v1/tools/leak/invoke", json={"arguments": {"how": "error"}})
        assert error.status_code == 400 and error.json()["error"]["message"] == "tool 'leak': refused with [redacted]"
        crash = api.post("/v1/tools/leak/invoke", json={"arguments": {"how": "crash"}})
        assert crash.status_code == 400 and LEAKED not in crash.text
        # A tool that declares no credential receives none, whatever the tenant's credentials grant.
        assert api.post("/v1/tools/no_secret/invoke", json={"arguments": {}}).json() == {
            "output": {"credential": "None"}
        }
        assert LEAKED not in api.get("/v1/audit").text
    assert LEAKED not in stack.logs()


def test_a_container_that_stops_makes_its_tools_fail_clearly_never_the_catalogue(
    stack: Stack, tenant: str, spare_port: int, tmp_path: Path
) -> None:
    module = tmp_path / "spare.py"
    module.write_text(WHOAMI)
    with stack.client(tenant, role="member") as api:
        assert "whoami" not in _tools(api)  # nothing listens there yet
        spare = serve_tools(module, spare_port)
        try:
            wait_until(lambda: "whoami" in _tools(api))  # found without restarting anything
            answer = api.post("/v1/tools/whoami/invoke", json={"arguments": {}})
            assert answer.json() == {"output": {"tenant": tenant, "user": "alice", "role": "member"}}
        finally:
            assert spare.stop() == 0
        down = api.post("/v1/tools/whoami/invoke", json={"arguments": {}})
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "UNAVAILABLE" and "is unavailable" in down.json()["error"]["message"]
        tools = _tools(api)  # the catalogue still answers, the other containers' tools still run
        assert tools["whoami"]["type"] == "container" and "forecast" in tools
        assert api.post("/v1/tools/forecast/invoke", json={"arguments": {"city": "Bern"}}).status_code == 200


def test_a_container_checks_the_tenants_token_as_every_service_does(weather: Container) -> None:
    claims = {"tenant_id": "acme", "sub": "x", "aud": "altan", "iss": "altan-dev", "exp": 2**40}
    other_key = jwt.encode(claims, "signed-with-another-secret-0123456789")
    request = container_pb2.InvokeContainerToolRequest(tool_id="forecast", arguments_json=b'{"city": "Paris"}')
    with grpc.insecure_channel(weather.address) as channel:
        stub = container_pb2_grpc.ToolContainerServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer not-a-token"),), (("authorization", f"Bearer {other_key}"),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.InvokeTool(request, metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Listing needs no token (the Tool Service lists containers outside any request); reflection names it.
        assert [t.tool_id for t in stub.ListTools(container_pb2.ListContainerToolsRequest(), timeout=10).tools] == [
            "forecast"
        ]
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert "altan.v1.ToolContainerService" in {s.name for s in answer.list_services_response.service}


def test_a_resumed_step_sends_its_idempotency_key_again_to_a_container_tool_and_an_mcp_tool(
    stack: Stack, tenant: str, mcp_servers: McpServers
) -> None:
    name = f"keys-{tenant}"
    plan = {
        "plan": [
            # Both in flight (3 s each) when the agent is killed; the restarted agent resumes the task.
            {"id": "c1", "tool": "remember", "arguments": {"name": name, "seconds": 3}},
            {"id": "m1", "tool": "ref__remember", "arguments": {"name": name, "seconds": 3}},
        ]
    }
    with stack.client(tenant) as api:
        server = api.put("/v1/mcp-servers/ref", json={"url": f"http://127.0.0.1:{mcp_servers.port}/mcp"})
        assert server.status_code == 201, server.text
        body = {"name": "keeper", "tools": ["remember", "ref__remember"]}
        agent_id = api.post("/v1/agents", json=body).json()["id"]
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]

        def noted(tool_id: str) -> list[str]:
            answer = api.post(f"/v1/tools/{tool_id}/invoke", json={"arguments": {"name": name, "note": False}})
            assert answer.status_code == 200, answer.text
            output = answer.json()["output"]
            return list(output["result"] if isinstance(output, dict) else output)

        wait_until(lambda: len(noted("remember")) == 1 and len(noted("ref__remember")) == 1)
        os.kill(stack.service_pids()["agent"], signal.SIGKILL)
        task = _terminal(stack, api, task_id)
    assert task["status"] == "succeeded", task
    # Each step called twice (before and after the crash), with one key: the container's and the MCP server's word.
    assert task["result"]["c1"] == [f"{task_id}:c1"] * 2
    assert task["result"]["m1"] == {"result": [f"{task_id}:m1"] * 2}
