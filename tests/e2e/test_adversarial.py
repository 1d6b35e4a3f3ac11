"""A hostile tenant, from outside: odd ids and tokens, races, more egress spellings, the public gRPC port.

Only behaviours that hold today are pinned here; see the adversarial QA report for the ones that do not.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest

from altan.v1 import agent_pb2, agent_pb2_grpc, integrator_pb2, integrator_pb2_grpc, tool_pb2, tool_pb2_grpc
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack

QUICK_PLAN = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": 1}, "path": "a"}}]}


def _agent(api: httpx.Client, tools: list[str]) -> str:
    answer = api.post("/v1/agents", json={"name": "hostile", "tools": tools})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _event_types(api: httpx.Client, task_id: str) -> list[str]:
    types = []
    with api.stream("GET", f"/v1/tasks/{task_id}/events", timeout=30) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data:"):
                types.append(json.loads(line[5:])["type"])
    return types


def _assert_error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, (answer.request.method, answer.request.url, answer.text)
    assert answer.json()["error"]["code"] == code
    assert set(answer.json()["error"]) == {"code", "message"}


# --- odd ids and methods ------------------------------------------------------------------------------------

ODD_IDS = ["..%2F..%2Fetc%2Fpasswd", "a:b", "*", "%7Bx%7D", "a%0D%0AX-Injected:%201", "%C3%A9", "x" * 5000]


@pytest.mark.parametrize("odd", ODD_IDS)
def test_odd_ids_are_plain_not_found(stack: Stack, tenant: str, odd: str) -> None:
    """Ids with traversal, key-separator, glob or header-injection characters name nothing: a JSON 404."""
    with stack.client(tenant) as api:
        _agent(api, ["json_extract"])
        api.post("/v1/tools", json={"tool_id": "mine", "name": "T", "endpoint": "https://example.com/x"})
        api.put("/v1/credentials/mine", json={"type": "api_key", "value": "v"})
        requests = [
            ("GET", f"/v1/agents/{odd}", None),
            ("PATCH", f"/v1/agents/{odd}", {"name": "x"}),
            ("DELETE", f"/v1/agents/{odd}", None),
            ("POST", f"/v1/agents/{odd}/tasks", {"input": QUICK_PLAN}),
            ("GET", f"/v1/tools/{odd}", None),
            ("DELETE", f"/v1/tools/{odd}", None),
            ("POST", f"/v1/tools/{odd}/invoke", {"arguments": {}}),
            ("GET", f"/v1/tasks/{odd}", None),
            ("GET", f"/v1/tasks/{odd}/events", None),
            ("POST", f"/v1/tasks/{odd}/cancel", None),
        ]
        for method, path, body in requests:
            answer = api.request(method, httpx.URL(stack.base_url + path), json=body)
            assert answer.status_code in (400, 404), (method, path[:80], answer.text[:200])
            assert answer.json()["error"]["code"] in ("INVALID_ARGUMENT", "NOT_FOUND")
        # Nothing was created, changed or deleted by any of it.
        assert len(api.get("/v1/agents").json()["agents"]) == 1
        assert api.get("/v1/tools/mine").status_code == 200
        assert [c["name"] for c in api.get("/v1/credentials").json()["credentials"]] == ["mine"]


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "TRACE"])
def test_unsupported_methods_answer_json(stack: Stack, tenant: str, method: str) -> None:
    with stack.client(tenant) as api:
        for path in ("/v1/agents", "/v1/tools", "/v1/credentials", "/v1/audit", "/v1/tasks/tsk_x/events"):
            answer = api.request(method, path)
            assert answer.status_code == 405, (method, path, answer.text)
            assert set(answer.json()["error"]) == {"code", "message"}
        assert api.head("/v1/agents").status_code == 405


def test_query_parameters_out_of_range(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        for path in ("/v1/agents", "/v1/tools", "/v1/credentials"):
            for params in ({"page_size": 501}, {"page_size": "1e3"}, {"page_size": "0x10"}, {"page_token": "LTE="}):
                _assert_error(api.get(path, params=params), 400, "INVALID_ARGUMENT")
        for limit in (1001, -1, "99999999999999999999"):
            _assert_error(api.get("/v1/audit", params={"limit": limit}), 400, "INVALID_ARGUMENT")
        assert api.get("/v1/audit", params={"task_id": "*"}).json() == {"events": []}


# --- tokens -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("odd", ["*T", "{T}", "T*", "T ", "é中T", "../T"])
def test_tenant_ids_with_odd_characters_stay_isolated(stack: Stack, tenant: str, odd: str) -> None:
    """A tenant_id that looks like a glob, a hash tag or a path never reaches another tenant's keys."""
    strange = odd.replace("T", tenant)
    with stack.client(tenant) as owner, stack.client(strange) as other:
        agent_id = _agent(owner, ["json_extract"])
        owner.put("/v1/credentials/c", json={"type": "api_key", "value": "v"})
        assert other.get("/v1/agents").json()["agents"] == []
        assert other.get(f"/v1/agents/{agent_id}").status_code == 404
        assert other.get("/v1/credentials").json()["credentials"] == []
        created = other.post("/v1/agents", json={"name": "theirs"})
        assert created.status_code == 201
        assert other.put("/v1/credentials/c", json={"type": "api_key", "value": "w"}).status_code == 201
        assert [a["id"] for a in owner.get("/v1/agents").json()["agents"]] == [agent_id]
        assert {e["tenant_id"] for e in other.get("/v1/audit").json()["events"]} <= {strange}


@pytest.mark.parametrize("claim", ["a:b", "x" * 129, ""])
def test_unusable_tenant_ids_are_401(stack: Stack, claim: str) -> None:
    with stack.client(claim) as api:
        _assert_error(api.get("/v1/agents"), 401, "UNAUTHENTICATED")
        _assert_error(api.post("/v1/agents", json={"name": "a"}), 401, "UNAUTHENTICATED")


def test_longest_tenant_id_works(stack: Stack, tenant: str) -> None:
    with stack.client(tenant.ljust(128, "x")) as api:
        assert api.post("/v1/agents", json={"name": "a"}).status_code == 201
        assert len(api.get("/v1/agents").json()["agents"]) == 1


# --- secrets ------------------------------------------------------------------------------------------------


def test_credential_values_with_line_breaks_are_refused_without_echo(stack: Stack, tenant: str) -> None:
    secret = f"sk-{tenant}-injected"
    with stack.client(tenant) as api:
        for spec in (
            {"type": "api_key", "value": f"{secret}\r\nX-Evil: 1"},
            {"type": "api_key", "value": secret, "prefix": "Bearer\n"},
            {"type": "api_key", "value": secret, "header": "X-Key\r\nX-Evil"},
        ):
            answer = api.put("/v1/credentials/c", json=spec)
            _assert_error(answer, 400, "INVALID_ARGUMENT")
            assert secret not in answer.text
        assert api.get("/v1/credentials").json()["credentials"] == []


def test_egress_refusal_with_a_credential_sends_and_shows_nothing(stack: Stack, tenant: str) -> None:
    secret = f"sk-{tenant}-never-sent"
    with stack.client(tenant) as api:
        # Even where the credential may go, the egress rules still decide.
        api.put("/v1/credentials/c", json={"type": "api_key", "value": secret, "hosts": ["169.254.169.254:80"]})
        answer = api.post(
            "/v1/tools/http_request/invoke",
            json={"arguments": {"url": "http://169.254.169.254/latest/meta-data/", "credential": "c"}},
        )
        _assert_error(answer, 403, "PERMISSION_DENIED")
        (event,) = api.get("/v1/audit", params={"limit": 1}).json()["events"]
        assert event["outcome"] == "denied" and event["credential"] == "c"
        assert secret not in answer.text and secret not in json.dumps(event)
    assert secret not in stack.logs()


def test_cross_origin_redirect_drops_the_authorization_credential(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    """Another spelling of the host is another origin: the credential does not follow the redirect."""
    secret = f"sk-{tenant}-first-hop-only"
    landing = f"/landed-{tenant}"
    other_origin = f"http://[::ffff:127.0.0.1]:{third_party.port}{landing}"
    with stack.client(tenant) as api:
        api.put("/v1/credentials/c", json={"type": "api_key", "value": secret, "hosts": [third_party.origin]})
        answer = api.post(
            "/v1/tools/http_request/invoke",
            json={
                "arguments": {
                    "url": f"{third_party.base_url}/redirect?to={quote(other_origin, safe='')}",
                    "credential": "c",
                }
            },
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"]["path"] == landing
        assert answer.json()["output"]["authenticated"] is False
    first = [r for r in third_party.requests_to("/redirect") if r.query.get("to") == [other_origin]]
    assert first and first[-1].headers.get("Authorization") == f"Bearer {secret}"
    (landed,) = third_party.requests_to(landing)
    assert "Authorization" not in landed.headers


# --- egress -------------------------------------------------------------------------------------------------

MORE_REFUSED = [
    ("http://[::]/", "unspecified"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::127.0.0.1]/", "embeds 127.0.0.1"),
    ("http://[64:ff9b::7f00:1]/", "embeds 127.0.0.1"),
    ("http://[2002:7f00:1::]/", "embeds 127.0.0.1"),
    ("http://[::ffff:a9fe:a9fe]/", "link-local"),
    ("http://[::ffff:0:127.0.0.1]/", "not a global unicast"),
    ("http://[fe80::1%25eth0]/", "not a valid host"),
    ("http://[fd00:ec2::254]/", "private"),
    ("http://0/", "unspecified"),
    ("http://017700000001/", "loopback"),
    ("http://127.000.000.001/", "loopback"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "link-local"),
    ("http://2852039166/", "link-local"),
    ("http://169.254.169.254./", "link-local"),
    ("http://4294967296/", "not a valid host"),
    ("http://\u2460\u2461\u2466.0.0.1/", "loopback"),  # circled digits normalize to 127.0.0.1
    ("http://127\u30020\u30020\u30021/", "loopback"),  # ideographic full stops
    ("http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/", "loopback name"),  # fullwidth "localhost"
    ("http://foo.localhost/", "loopback name"),
    ("http://LOCALHOST/", "loopback name"),
    ("http://%31%32%37.0.0.1/", "not a valid host"),
    ("http://localhost%00/", "not a valid host"),
    ("http://100.100.100.200/", "CGNAT"),
    ("http://192.0.0.192/", "reserved"),
    ("HTTP://127.0.0.1/", "loopback"),
    ("\thttp://127.0.0.1/", "loopback"),
    ("http:/127.0.0.1/", "no host"),
    ("http://127.0.0.1:99999/", "malformed"),
    ("ws://127.0.0.1/", "scheme 'ws'"),
    ("data:text/plain,hi", "scheme 'data'"),
]


@pytest.mark.parametrize(("url", "reason"), MORE_REFUSED)
def test_more_private_spellings_are_refused(stack: Stack, tenant: str, url: str, reason: str) -> None:
    with stack.client(tenant) as api:
        answer = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": url}})
        _assert_error(answer, 403, "PERMISSION_DENIED")
        assert reason in answer.json()["error"]["message"]


def test_backslash_authority_trick_is_judged_by_the_real_host(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    with stack.client(tenant) as api:
        url = f"http://127.0.0.1:{third_party.port}\\@169.254.169.254/"
        answer = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": url}})
        _assert_error(answer, 403, "PERMISSION_DENIED")
        assert "169.254.169.254" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    "location",
    [
        "http://localhost:{port}/",
        "http://[::1]:{port}/",
        "http://0x7f000001:{other}/",
        "//169.254.169.254/latest/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
    ],
)
def test_redirects_to_private_or_odd_destinations_are_refused(
    stack: Stack, tenant: str, third_party: FakeThirdParty, location: str
) -> None:
    other = third_party.port + 1 if third_party.port < 65535 else third_party.port - 1
    target = location.format(port=third_party.port, other=other)
    with stack.client(tenant) as api:
        answer = api.post(
            "/v1/tools/http_request/invoke",
            json={"arguments": {"url": f"{third_party.base_url}/redirect?to={quote(target, safe='')}"}},
        )
        _assert_error(answer, 403, "PERMISSION_DENIED")
        assert answer.json()["error"]["message"].startswith("egress refused")
        assert api.get("/v1/audit", params={"limit": 1}).json()["events"][0]["outcome"] == "denied"


def test_redirect_chains_are_capped_at_five(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    def chain(hops: int) -> str:
        url = f"{third_party.base_url}/chain-end-{tenant}"
        for _ in range(hops):
            url = f"{third_party.base_url}/redirect?to={quote(url, safe='')}"
        return url

    with stack.client(tenant) as api:
        ok = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": chain(5)}})
        assert ok.status_code == 200 and ok.json()["output"]["path"] == f"/chain-end-{tenant}"
        too_many = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": chain(6)}})
        _assert_error(too_many, 400, "FAILED_PRECONDITION")
        assert "too many redirects" in too_many.json()["error"]["message"]


# --- races and volume ---------------------------------------------------------------------------------------


def test_concurrent_submits_with_one_idempotency_key_make_one_task(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as admin:
        agent_id = _agent(admin, ["json_extract"])

    def submit(_: int) -> tuple[int, str]:
        with stack.client(tenant, "member") as member:
            answer = member.post(f"/v1/agents/{agent_id}/tasks", json={"input": QUICK_PLAN, "idempotency_key": "race"})
            return answer.status_code, answer.json().get("task_id", answer.text)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(submit, range(20)))
    assert {status for status, _ in answers} == {202}
    task_ids = {task_id for _, task_id in answers}
    assert len(task_ids) == 1
    (task_id,) = task_ids
    with stack.client(tenant) as api:
        assert _event_types(api, task_id).count("task.queued") == 1
        assert api.get(f"/v1/tasks/{task_id}").json()["status"] == "succeeded"
        assert api.get("/v1/audit", params={"task_id": task_id}).json()["events"][0]["task_id"] == task_id
        assert len(api.get("/v1/audit", params={"task_id": task_id}).json()["events"]) == 1


def test_concurrent_cancels_end_a_task_once(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    plan = {"plan": [{"id": "slow", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/sleep/5"}}]}
    with stack.client(tenant) as admin:
        agent_id = _agent(admin, ["http_request"])
        task_id = admin.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        with admin.stream("GET", f"/v1/tasks/{task_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["type"] == "tool.started":
                    break

    def cancel(_: int) -> tuple[int, str]:
        with stack.client(tenant, "member") as member:
            answer = member.post(f"/v1/tasks/{task_id}/cancel")
            body = answer.json()
            return answer.status_code, body.get("status") or body["error"]["code"]

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(cancel, range(10)))
    assert (200, "cancelled") in answers
    assert set(answers) <= {(200, "cancelled"), (400, "FAILED_PRECONDITION")}
    with stack.client(tenant) as api:
        types = _event_types(api, task_id)
        assert [t for t in types if t in ("task.succeeded", "task.failed", "task.cancelled")] == ["task.cancelled"]
        assert api.get(f"/v1/tasks/{task_id}").json()["status"] == "cancelled"


def test_many_followers_of_one_task_all_see_every_event(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    plan = {
        "plan": [
            {"id": f"p{i}", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/sleep/0.5"}}
            for i in range(20)
        ]
    }
    with stack.client(tenant) as admin:
        agent_id = _agent(admin, ["http_request"])
        task_id = admin.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]

    def follow(_: int) -> list[str]:
        with stack.client(tenant, "member") as member:
            return _event_types(member, task_id)

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        seen = list(pool.map(follow, range(30)))
    expected = ["task.queued", "task.started", *["tool.started"] * 20, *["tool.finished"] * 20, "task.succeeded"]
    for types in seen:
        assert sorted(types) == sorted(expected)
        assert types[0] == "task.queued" and types[-1] == "task.succeeded"


def test_a_hundred_step_chain_runs_and_a_hundred_and_one_is_refused(stack: Stack, tenant: str) -> None:
    steps: list[dict[str, Any]] = [{"id": "s0", "tool": "json_extract", "arguments": {"data": {"a": ""}, "path": "a"}}]
    steps.append(
        {
            "id": "s1",
            "tool": "text_template",
            "depends_on": ["s0"],
            "arguments": {"template": "{{ v }}.", "values": {"v": "${s0.output.value}"}},
        }
    )
    for i in range(2, 100):
        steps.append(
            {
                "id": f"s{i}",
                "tool": "text_template",
                "depends_on": [f"s{i - 1}"],
                "arguments": {"template": "{{ v }}.", "values": {"v": f"${{s{i - 1}.output.text}}"}},
            }
        )
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["json_extract", "text_template"])
        extra = {"id": "extra", "tool": "json_extract", "arguments": {"data": 1, "path": "a"}}
        refused = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": {"plan": [*steps, extra]}})
        _assert_error(refused, 400, "INVALID_ARGUMENT")
        assert "at most 100 steps" in refused.json()["error"]["message"]
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": {"plan": steps}}).json()["task_id"]
        assert _event_types(api, task_id)[-1] == "task.succeeded"
        task = api.get(f"/v1/tasks/{task_id}").json()
        assert task["result"]["s99"] == {"text": "." * 99}
        assert task["usage"]["tool_calls"] == 100


def test_self_and_sibling_references_are_refused(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["json_extract"])
        for plan in (
            [{"id": "s1", "tool": "json_extract", "arguments": {"data": "${s1.output}", "path": "a"}}],
            [{"id": "s1", "tool": "json_extract", "depends_on": ["s1"], "arguments": {"data": 1, "path": "a"}}],
            [
                {"id": "s1", "tool": "json_extract", "arguments": {"data": 1, "path": "a"}},
                {"id": "s2", "tool": "json_extract", "arguments": {"data": "${s1.output.value}", "path": "a"}},
            ],
        ):
            _assert_error(
                api.post(f"/v1/agents/{agent_id}/tasks", json={"input": {"plan": plan}}), 400, "INVALID_ARGUMENT"
            )


def test_template_output_is_bounded(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        answer = api.post(
            "/v1/tools/text_template/invoke",
            json={"arguments": {"template": "{{ a }}" * 17, "values": {"a": "y" * 60_000}}},
        )
        _assert_error(answer, 400, "INVALID_ARGUMENT")
        assert "longer than" in answer.json()["error"]["message"]


# --- public gRPC --------------------------------------------------------------------------------------------


def test_public_grpc_keeps_roles_and_tenants_apart(stack: Stack, tenant: str) -> None:
    def metadata(tenant_id: str, role: str = "admin") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {stack.token(tenant_id, role)}"),)

    admin, member, stranger = metadata(tenant), metadata(tenant, "member"), metadata(tenant + "-other")
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        agents = agent_pb2_grpc.AgentServiceStub(channel)
        tools = tool_pb2_grpc.ToolServiceStub(channel)
        integrator = integrator_pb2_grpc.IntegratorServiceStub(channel)
        spec = agent_pb2.Agent(name="a", tools=["json_extract"])
        agent_id = agents.CreateAgent(agent_pb2.CreateAgentRequest(agent=spec), metadata=admin, timeout=10).agent.id
        tool_spec = tool_pb2.Tool(tool_id="mine", name="T", endpoint="https://example.com/x")
        tools.CreateTool(tool_pb2.CreateToolRequest(tool=tool_spec), metadata=admin, timeout=10)
        cred = integrator_pb2.CredentialSpec(api_key=integrator_pb2.ApiKeySpec(value="v"))
        integrator.PutCredential(
            integrator_pb2.PutCredentialRequest(name="c", credential=cred), metadata=admin, timeout=10
        )
        task_id = agents.SubmitTask(
            agent_pb2.SubmitTaskRequest(agent_id=agent_id, input_json=json.dumps(QUICK_PLAN).encode()),
            metadata=admin,
            timeout=10,
        ).task_id
        list(agents.StreamTaskEvents(agent_pb2.StreamTaskEventsRequest(task_id=task_id), metadata=admin, timeout=10))

        def code(call: Any, request: Any, md: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
            try:
                result = call(request, metadata=md, timeout=10)
                if not hasattr(result, "ByteSize"):
                    list(result)
            except grpc.RpcError as err:
                return err.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        denied = grpc.StatusCode.PERMISSION_DENIED
        assert code(agents.CreateAgent, agent_pb2.CreateAgentRequest(agent=spec), member) == denied
        patch = agent_pb2.UpdateAgentRequest(agent_id=agent_id, agent=agent_pb2.Agent(name="x"))
        assert code(agents.UpdateAgent, patch, member) == denied
        assert code(agents.DeleteAgent, agent_pb2.DeleteAgentRequest(agent_id=agent_id), member) == denied
        assert code(tools.CreateTool, tool_pb2.CreateToolRequest(tool=tool_spec), member) == denied
        assert code(tools.DeleteTool, tool_pb2.DeleteToolRequest(tool_id="mine"), member) == denied
        put = integrator_pb2.PutCredentialRequest(name="c2", credential=cred)
        assert code(integrator.PutCredential, put, member) == denied
        assert code(integrator.DeleteCredential, integrator_pb2.DeleteCredentialRequest(name="c"), member) == denied

        missing = grpc.StatusCode.NOT_FOUND
        assert code(agents.GetAgent, agent_pb2.GetAgentRequest(agent_id=agent_id), stranger) == missing
        assert code(agents.GetTask, agent_pb2.GetTaskRequest(task_id=task_id), stranger) == missing
        assert code(agents.CancelTask, agent_pb2.CancelTaskRequest(task_id=task_id), stranger) == missing
        stream = agent_pb2.StreamTaskEventsRequest(task_id=task_id)
        assert code(agents.StreamTaskEvents, stream, stranger) == missing
        assert code(tools.GetTool, tool_pb2.GetToolRequest(tool_id="mine"), stranger) == missing
        assert code(integrator.InvokeTool, integrator_pb2.InvokeToolRequest(tool_id="mine"), stranger) == missing
        assert code(integrator.GetCredential, integrator_pb2.GetCredentialRequest(name="c"), stranger) == missing
        borrowed = integrator_pb2.InvokeToolRequest(
            tool_id="http_request",
            arguments_json=json.dumps({"url": "https://example.com/", "credential": "c"}).encode(),
        )
        assert code(integrator.InvokeTool, borrowed, stranger) == grpc.StatusCode.FAILED_PRECONDITION
        audit = integrator.ListAuditEvents(
            integrator_pb2.ListAuditEventsRequest(task_id=task_id, limit=10), metadata=stranger, timeout=10
        )
        assert list(audit.events) == []
        credentials = integrator.ListCredentials(integrator_pb2.ListCredentialsRequest(), metadata=stranger, timeout=10)
        assert list(credentials.credentials) == []


def test_audit_by_another_tenants_task_id_is_empty(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as owner, stack.client(tenant + "-other") as stranger:
        agent_id = _agent(owner, ["json_extract"])
        task_id = owner.post(f"/v1/agents/{agent_id}/tasks", json={"input": QUICK_PLAN}).json()["task_id"]
        _event_types(owner, task_id)
        assert len(owner.get("/v1/audit", params={"task_id": task_id}).json()["events"]) == 1
        assert stranger.get("/v1/audit", params={"task_id": task_id}).json() == {"events": []}
        assert stranger.get("/v1/audit").json() == {"events": []}
