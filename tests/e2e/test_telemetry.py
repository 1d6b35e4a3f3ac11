"""Traces and metrics across the real processes: a stack exporting to an OTLP receiver on a real socket.

One task, natural-language or plan, is one trace: the gateway's request, the agent, the integrator (its model and
tool calls), the tool service and the call to the third party, each span carrying the tenant and the task, and
none carrying a secret or a prompt. The task's ``trace_id`` names that trace, and every log line its services wrote
for it. Each service serves its metrics, with exemplars naming sampled traces, and never a tenant's names.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from altan.v1 import agent_pb2, agent_pb2_grpc
from tests.e2e.fake_llms import INSTALL_KEY, Llms
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack, free_port, start_stack
from tests.e2e.test_tasks import _finished
from tests.fakes.llm import Call, Reply
from tests.fakes.otlp import OtlpReceiver, ReceivedSpan, start_otlp_receiver

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
SERVICES = {"altan-gateway", "altan-agent", "altan-integrator", "altan-tool"}
SECRET = "sk-telemetry-secret-5e1f0c9a7b3d"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    running = start_otlp_receiver()
    yield running
    running.close()


@pytest.fixture(scope="module")
def traced(
    receiver: OtlpReceiver, third_party: FakeThirdParty, llms: Llms, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """``altan up`` with tracing on: every span sampled, exported over OTLP/HTTP to ``receiver`` every 100 ms."""
    ports = {name: free_port() for name in ("agent", "tool", "integrator")}
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "ALTAN_OPENAI_API_KEY": INSTALL_KEY,
        "ALTAN_OPENAI_API_HOSTS": "127.0.0.1",
        **{f"ALTAN_{name.upper()}_METRICS_PORT": str(port) for name, port in ports.items()},
    }
    allow = ",".join(f"127.0.0.1:{p}" for p in (third_party.port, llms.openai.port))
    data_dir: Path = tmp_path_factory.mktemp("data-traced")
    running = start_stack(data_dir=data_dir, egress_allow=allow, redis_url=None, extra_env=env)
    running.internal_ports.update({f"{name}-metrics": port for name, port in ports.items()})
    yield running
    assert running.stop() == 0, running.logs()[-5000:]


def _complete(spans: list[ReceivedSpan]) -> bool:
    """Every service exported its part, the call to the third party included, and every parent arrived."""
    ids = {s.span_id for s in spans}
    return (
        {s.service for s in spans} >= SERVICES
        and any(_outbound(s) for s in spans)
        and all(not s.parent_span_id or s.parent_span_id in ids for s in spans)
    )


def _outbound(span: ReceivedSpan) -> bool:
    return span.service == "altan-tool" and span.kind == CLIENT


def _one_connected_trace(spans: list[ReceivedSpan]) -> None:
    """One root (the gateway's request), and every other span's parent is in the trace."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert [(r.service, r.kind) for r in roots] == [("altan-gateway", SERVER)], roots
    orphans = [(s.service, s.name) for s in spans if s.parent_span_id and s.parent_span_id not in ids]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"


def _tenant_and_task(spans: list[ReceivedSpan], tenant: str, task_id: str) -> None:
    for service in SERVICES:
        mine = [s for s in spans if s.service == service]
        assert all(s.attributes.get("altan.tenant_id") == tenant for s in mine if s.kind == SERVER), (service, mine)
        if service != "altan-gateway":  # the gateway's request comes before the task has an id
            assert any(s.attributes.get("altan.task_id") == task_id for s in mine), (service, mine)


def _nothing_secret(receiver: OtlpReceiver, *never: str) -> None:
    exported = receiver.all_bytes()
    for text in never:
        assert text.encode() not in exported, f"{text!r} was exported in a span"


def test_a_natural_language_task_is_one_trace_across_every_service(
    traced: Stack, receiver: OtlpReceiver, tenant: str, llms: Llms, third_party: FakeThirdParty
) -> None:
    prompt = f"Fetch the record, please {uuid.uuid4().hex}"
    answer = f"Here it is {uuid.uuid4().hex}"
    model = llms.model(
        Reply(calls=(Call("http_request", {"url": f"{third_party.base_url}/traced-nl"}),)), Reply(text=answer)
    )
    with traced.client(tenant) as api:
        assert api.put("/v1/credentials/llm-key", json={"type": "api_key", "value": SECRET}).status_code in (200, 201)
        llm = llms.config(model, auth={"type": "api_key", "credential": "llm-key"})
        body = {"name": "traced", "instructions": "Be brief.", "llm": llm, "tools": ["http_request"]}
        agent_id = api.post("/v1/agents", json=body).json()["id"]
        submitted = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": prompt})
        assert submitted.status_code == 202, submitted.text
        task = _finished(api, submitted.json()["task_id"])
    assert task["status"] == "succeeded", task
    trace_id = task["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id != "0" * 32

    def done(spans: list[ReceivedSpan]) -> bool:
        return _complete(spans) and sum(s.name == f"chat {model}" for s in spans) == 2

    spans = receiver.wait_for(trace_id, done)
    _one_connected_trace(spans)
    _tenant_and_task(spans, tenant, task["task_id"])
    chats = [s for s in spans if s.name == f"chat {model}"]
    assert {s.service for s in chats} == {"altan-integrator"} and all(s.kind == CLIENT for s in chats)
    for chat in chats:
        attributes = chat.attributes
        assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.model"] == model
        assert attributes["gen_ai.provider.name"] == "openai"
        assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
        assert attributes["altan.task_id"] == task["task_id"]
    outbound = [s for s in spans if _outbound(s)]
    assert [(s.name, s.attributes["server.port"], s.attributes["http.response.status_code"]) for s in outbound] == [
        ("GET", third_party.port, 200)
    ]
    assert any(s.service == "altan-integrator" and s.kind == CLIENT and s.name == "POST" for s in spans), (
        "the integrator's request to the LLM API is a span too"
    )
    _nothing_secret(receiver, SECRET, INSTALL_KEY, prompt, answer, "Be brief.")
    # The trace context stays inside the install: neither the LLM API nor the tool's third party saw it.
    assert all("traceparent" not in r.headers for r in llms.requests(model))
    assert all("traceparent" not in {k.lower() for k in r.headers} for r in third_party.requests_to("/traced-nl"))


def test_a_plan_task_is_one_trace_and_its_logs_carry_the_trace_id(
    traced: Stack, receiver: OtlpReceiver, tenant: str, third_party: FakeThirdParty
) -> None:
    tool = {
        "tool_id": "crm_lookup",
        "name": "CRM lookup",
        "description": "reads a record",
        "parameters": [{"name": "record", "type": "string", "required": True}],
        "endpoint": f"{third_party.base_url}/traced-plan",
        "method": "POST",
        "auth": "api_key",
        "credential": "crm",
    }
    argument = f"record-{uuid.uuid4().hex}"
    with traced.client(tenant) as api:
        assert api.put("/v1/credentials/crm", json={"type": "api_key", "value": SECRET}).status_code in (200, 201)
        assert api.post("/v1/tools", json=tool).status_code == 201
        agent_id = api.post("/v1/agents", json={"name": "planner", "tools": ["crm_lookup"]}).json()["id"]
        plan = {"plan": [{"id": "s1", "tool": "crm_lookup", "arguments": {"record": argument}}]}
        submitted = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan})
        assert submitted.status_code == 202, submitted.text
        task = _finished(api, submitted.json()["task_id"])
    assert task["status"] == "succeeded", task
    sent = {k.lower(): v for k, v in third_party.requests_to("/traced-plan")[-1].headers.items()}
    assert sent["authorization"] == f"Bearer {SECRET}" and "traceparent" not in sent

    spans = receiver.wait_for(task["trace_id"], _complete)
    _one_connected_trace(spans)
    _tenant_and_task(spans, tenant, task["task_id"])
    tool_calls = [s for s in spans if s.attributes.get("gen_ai.tool.name") == "crm_lookup"]
    assert [
        (s.service, s.name, s.attributes["altan.tool.kind"], s.attributes["altan.tool.outcome"]) for s in tool_calls
    ] == [("altan-integrator", "altan.v1.IntegratorRuntimeService/RunTool", "http", "ok")]
    served = {(s.service, s.name) for s in spans if s.kind == SERVER}
    assert {
        ("altan-agent", "altan.v1.AgentService/SubmitTask"),
        ("altan-integrator", "altan.v1.IntegratorRuntimeService/RunTool"),
        ("altan-tool", "altan.v1.ToolRuntimeService/ExecuteTool"),
    } <= served, served
    _nothing_secret(receiver, SECRET, argument)
    # Probes (`altan up` polled /readyz until the stack was up) are counted, never traced.
    probes = [s for s in receiver.spans if s.attributes.get("http.route") in ("/healthz", "/readyz", "/metrics")]
    assert not probes

    # `altan up` prefixes each service's lines with its name: "   gateway | {...}".
    lines = [json.loads(line.partition(" | ")[2]) for line in traced.logs().splitlines() if task["trace_id"] in line]
    services = {line["logging.googleapis.com/labels"]["service"] for line in lines if line.get("trace_id")}
    assert {"gateway", "agent", "integrator", "tool"} <= services, services


def _samples(text: str) -> list[tuple[str, dict[str, str], float, dict[str, str] | None]]:
    """(name, labels, value, exemplar labels) of every sample of an OpenMetrics page."""
    return [
        (sample.name, sample.labels, sample.value, sample.exemplar.labels if sample.exemplar else None)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _has(samples: list[tuple[str, dict[str, str], float, dict[str, str] | None]], name: str, **labels: str) -> bool:
    return any(n == name and labels.items() <= found.items() and value > 0 for n, found, value, _ in samples)


def test_each_service_serves_its_metrics_with_exemplars_and_no_tenant_names(traced: Stack, tenant: str) -> None:
    marker = f"{tenant}-metrics"
    with traced.client(marker) as api:
        agent_id = api.post("/v1/agents", json={"name": "metrics-probe", "tools": ["json_extract"]}).json()["id"]
        plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": 1}, "path": "a"}}]}
        task = _finished(api, api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"])
        refused = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": "http://169.254.169.254/"}})
        assert refused.status_code == 403, refused.text
    assert task["status"] == "succeeded", task
    openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
    with httpx.Client(trust_env=False, timeout=10) as anonymous:
        assert anonymous.get(f"{traced.base_url}/v1/agents").status_code == 401
        gateway = anonymous.get(f"{traced.base_url}/metrics", headers=openmetrics)
        pages = {
            name: anonymous.get(
                f"http://127.0.0.1:{traced.internal_ports[f'{name}-metrics']}/metrics", headers=openmetrics
            ).text
            for name in ("agent", "tool", "integrator")
        }
    assert gateway.headers["content-type"].startswith("application/openmetrics-text")
    pages["gateway"] = gateway.text
    found = {service: _samples(text) for service, text in pages.items()}
    server = "altan_grpc_server_handled_total"
    # grpc-ecosystem's labels, which the chart's alerts and dashboard read.
    submitted = {"grpc_service": "altan.v1.AgentService", "grpc_method": "SubmitTask", "grpc_type": "unary"}
    assert _has(found["agent"], server, **submitted, grpc_code="OK")
    assert _has(found["agent"], server, grpc_method="StreamTaskEvents", grpc_type="server_stream", grpc_code="OK")
    assert _has(found["tool"], "altan_grpc_server_handling_seconds_count", grpc_method="ExecuteTool")
    assert _has(found["agent"], "altan_grpc_client_handling_seconds_count", grpc_method="RunTool")
    assert _has(found["gateway"], "altan_grpc_client_handled_total", grpc_method="SubmitTask", grpc_code="OK")
    assert _has(found["integrator"], "altan_tool_calls_total", kind="builtin", outcome="ok")
    assert _has(found["gateway"], "altan_auth_failures_total", service="gateway")
    assert _has(found["tool"], "altan_egress_refused_total")
    assert _has(found["integrator"], "altan_tool_calls_total", kind="builtin", outcome="denied")
    assert ("altan_task_queue_depth", {}, 0.0, None) in found["agent"]
    # OpenMetrics exemplars name the sampled trace a sample was counted in.
    exemplars = [e for _, _, _, e in found["gateway"] + found["integrator"] if e]
    assert exemplars and all(re.fullmatch(r"[0-9a-f]{32}", e["trace_id"]) for e in exemplars)
    assert any(n == "altan_tool_calls_total" and e for n, _, _, e in found["integrator"])
    for service, text in pages.items():
        for identifier in (marker, tenant, agent_id, task["task_id"], "metrics-probe"):
            assert identifier not in text, (service, identifier)


def test_a_public_grpc_call_starts_its_own_trace_whatever_the_client_sends(
    traced: Stack, receiver: OtlpReceiver, tenant: str, third_party: FakeThirdParty
) -> None:
    """A tenant may not choose the trace its requests join (nor force sampling): the gateway starts a new one."""
    chosen = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (
        ("authorization", f"Bearer {traced.token(tenant)}"),
        ("traceparent", f"00-{chosen}-00f067aa0ba902b7-01"),
    )
    plan = {"plan": [{"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/grpc"}}]}
    with grpc.insecure_channel(f"127.0.0.1:{traced.grpc_port}") as channel:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        agent = agent_pb2.Agent(name="via-grpc", tools=["http_request"])
        created = agents.CreateAgent(agent_pb2.CreateAgentRequest(agent=agent), metadata=metadata, timeout=10).agent
        request = agent_pb2.SubmitTaskRequest(agent_id=created.id, input_json=json.dumps(plan).encode())
        submitted = agents.SubmitTask(request, metadata=metadata, timeout=10)
        stream = agent_pb2.StreamTaskEventsRequest(task_id=submitted.task_id)
        assert list(agents.StreamTaskEvents(stream, metadata=metadata, timeout=10))[-1].event.type == "task.succeeded"
        task = agents.GetTask(agent_pb2.GetTaskRequest(task_id=submitted.task_id), metadata=metadata, timeout=10).task
    assert re.fullmatch(r"[0-9a-f]{32}", task.trace_id) and task.trace_id != chosen
    spans = receiver.wait_for(task.trace_id, _complete)
    _one_connected_trace(spans)
    _tenant_and_task(spans, tenant, task.task_id)
    root = next(s for s in spans if not s.parent_span_id)
    assert root.name == "altan.v1.AgentService/SubmitTask" and root.attributes["rpc.system"] == "grpc"
    assert receiver.trace(chosen) == []


def test_a_task_has_a_trace_id_and_its_log_lines_carry_it_with_tracing_off(stack: Stack, tenant: str) -> None:
    """Tracing off (the default), the trace id is still drawn, passed on and logged: a user hands it to an operator,
    who finds the task's log lines in every service."""
    with stack.client(tenant) as api:
        agent_id = api.post("/v1/agents", json={"name": "untraced", "tools": ["json_extract"]}).json()["id"]
        plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": 1}, "path": "a"}}]}
        submitted = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan})
        task = _finished(api, submitted.json()["task_id"])
        again = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()
        other = _finished(api, again["task_id"])
    assert task["status"] == "succeeded", task
    assert re.fullmatch(r"[0-9a-f]{32}", task["trace_id"]) and task["trace_id"] != "0" * 32
    assert other["trace_id"] != task["trace_id"], "each request is its own trace"
    lines = [json.loads(line.partition(" | ")[2]) for line in stack.logs().splitlines() if task["trace_id"] in line]
    services = {line["logging.googleapis.com/labels"]["service"] for line in lines}
    assert {"gateway", "agent", "integrator", "tool"} <= services, services
    assert all(
        line["trace_id"] == task["trace_id"] and not line["logging.googleapis.com/trace_sampled"] for line in lines
    )
