"""Bad input gets a clear 4xx and changes nothing; never a 500 or a stack trace."""

from __future__ import annotations

import pytest

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack

ROUTES = [
    ("POST", "/v1/agents"),
    ("PATCH", "/v1/agents/agt_x"),
    ("POST", "/v1/tools"),
    ("POST", "/v1/tools/json_extract/invoke"),
    ("PUT", "/v1/credentials/c"),
    ("POST", "/v1/agents/agt_x/tasks"),
]

BODIES = [b"{", b"[]", b'"text"', b"null", b"12", b"\xff\xfe", b'{"a": NaN', b""]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("body", BODIES)
def test_malformed_bodies_are_400(stack: Stack, tenant: str, method: str, path: str, body: bytes) -> None:
    with stack.client(tenant) as api:
        answer = api.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code in (400, 404), answer.text
        assert answer.json()["error"]["code"] in ("INVALID_ARGUMENT", "NOT_FOUND")
        assert "Traceback" not in answer.text


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_oversized_bodies_are_413(stack: Stack, tenant: str, method: str, path: str) -> None:
    big = b'{"name": "' + b"x" * (65 * 1024) + b'"}'
    with stack.client(tenant) as api:
        answer = api.request(method, path, content=big)
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "RESOURCE_EXHAUSTED"

        def chunks():  # no Content-Length: the limit still holds while streaming
            for _ in range(70):
                yield b"x" * 1024

        assert api.request(method, path, content=chunks()).status_code == 413
        assert api.get("/v1/agents").json()["agents"] == []


def test_wrong_types_and_unknown_ids(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        answers = [
            api.post("/v1/agents", json={"name": ["list"]}),
            api.post("/v1/agents", json={"name": "a", "instructions": 5}),
            api.post("/v1/agents", json={"name": "a", "fallback_llms": {}}),
            api.post("/v1/tools", json={"tool_id": 5}),
            api.post("/v1/tools/json_extract/invoke", json={"arguments": "x"}),
            api.post("/v1/tools/json_extract/invoke", json={"args": {}}),
            api.get("/v1/agents", params={"page_size": "ten"}),
            api.get("/v1/agents", params={"page_size": -1}),
            api.get("/v1/agents", params={"page_token": "%%%"}),
            api.get("/v1/audit", params={"limit": "lots"}),
            api.post("/v1/agents/x/tasks", json={"input": {"plan": []}, "idempotency_key": 7}),
        ]
        for answer in answers:
            assert answer.status_code == 400, (answer.request.url, answer.text)
        for path in ("/v1/agents/nope", "/v1/tools/nope", "/v1/tasks/nope", "/v1/tasks/nope/events", "/v1/nothing"):
            answer = api.get(path)
            assert answer.status_code == 404, path
            assert answer.json()["error"]["code"] == "NOT_FOUND"
        assert api.post("/v1/tools/nope/invoke", json={"arguments": {}}).status_code == 404
        assert api.delete("/v1/credentials/nope").status_code == 404
        assert api.post("/v1/tasks/nope/cancel").status_code == 404
        assert api.get("/v1/agents").json()["agents"] == []


def test_operations_endpoints(stack: Stack) -> None:
    import httpx

    with httpx.Client(base_url=stack.base_url, trust_env=False) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").status_code == 200
        metrics = anonymous.get("/metrics")
        assert metrics.status_code == 200 and "altan_http_requests_total" in metrics.text
        spec = anonymous.get("/openapi.json").json()
        for path in (
            "/v1/agents",
            "/v1/tools/{tool_id}/invoke",
            "/v1/credentials/{name}",
            "/v1/tasks/{task_id}/events",
            "/v1/audit",
        ):
            assert path in spec["paths"]
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert spec["paths"]["/v1/agents"]["post"]["security"] == [{"bearer": []}]


def test_public_metrics_carry_no_tenant_identifiers_or_per_tenant_volumes(stack: Stack, tenant: str) -> None:
    """API.md: /metrics never shows one tenant's identifiers or volumes to another (it needs no token at all)."""
    import httpx

    marker = f"{tenant}-metrics"
    with stack.client(marker) as api:
        agent_id = api.post("/v1/agents", json={"name": "metrics-probe", "tools": ["json_extract"]}).json()["id"]
        api.put("/v1/credentials/crm-metrics-probe", json={"type": "api_key", "value": "sk-metrics-probe"})
        for _ in range(3):
            api.get(f"/v1/agents/{agent_id}")
            api.get("/v1/tools/json_extract-metrics-probe")
            api.post("/v1/tools/json_extract/invoke", json={"arguments": {"data": {}, "path": "x"}})
    with httpx.Client(base_url=stack.base_url, trust_env=False) as anonymous:
        text = anonymous.get("/metrics").text
        # Each service's own metrics (altan.metrics), on its metrics port, are held to the same rule.
        services = {
            name: anonymous.get(f"http://127.0.0.1:{stack.internal_ports[f'{name}-metrics']}/metrics").text
            for name in ("agent", "tool", "integrator")
        }
    assert "altan_grpc_client_handling_seconds_bucket" in text  # the gateway's calls to the services
    for name, page in services.items():
        assert "altan_grpc_server_handled_total" in page and "altan_grpc_server_handling_seconds_bucket" in page, name
    assert 'altan_tool_calls_total{kind="builtin",outcome="ok"}' in services["integrator"]
    for page in (text, *services.values()):
        for identifier in (marker, tenant, agent_id, "crm-metrics-probe", "metrics-probe", "sk-metrics-probe"):
            assert identifier not in page
    text = "\n".join((text, *services.values()))
    labels = {
        name
        for line in text.splitlines()
        if "{" in line and not line.startswith("#")
        for name in (pair.split("=")[0] for pair in line.split("{", 1)[1].split("}")[0].split(","))
    }
    assert not {label for label in labels if "tenant" in label or "user" in label or "sub" in label}
    routes = {line.split('route="')[1].split('"')[0] for line in text.splitlines() if 'route="' in line}
    assert "/v1/agents/{agent_id}" in routes, "requests are counted by route template, not by path"


def test_deep_nesting_and_broken_unicode_are_400(stack: Stack, tenant: str) -> None:
    deep: object = "x"
    for _ in range(600):
        deep = [deep]
    with stack.client(tenant) as api:
        agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["json_extract"]}).json()["id"]
        plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": deep, "path": "x"}}]}
        for _ in range(3):  # repeated: the service must stay up
            answer = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan})
            assert answer.status_code == 400 and "nested deeper" in answer.json()["error"]["message"]
        lone = api.post("/v1/agents", content=b'{"name": "\\ud800"}')
        assert lone.status_code == 400 and "Unicode" in lone.json()["error"]["message"]
        assert api.get("/readyz").status_code == 200


def test_unsendable_http_requests_are_400(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    url = f"{third_party.base_url}/unsendable"
    with stack.client(tenant) as api:
        for arguments in (
            {"url": url, "json": {"a": 1}, "body": "x"},
            {"url": url, "headers": {"X-Name": "é\u2603"}},
        ):
            answer = api.post("/v1/tools/http_request/invoke", json={"arguments": arguments})
            assert answer.status_code == 400, answer.text


@pytest.mark.parametrize("location", ["http://[::1", "http://:99999/x", "http://exa mple.com/", "http://%zz/", "//"])
def test_a_malformed_redirect_location_is_a_clear_4xx(
    stack: Stack, tenant: str, third_party: FakeThirdParty, location: str
) -> None:
    """A third party's malformed Location header used to be a 500."""
    url = f"{third_party.base_url}/redirect"
    with stack.client(tenant) as api:
        answer = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": url, "query": {"to": location}}})
        assert 400 <= answer.status_code < 500, answer.text
        assert answer.json()["error"]["code"] in ("FAILED_PRECONDITION", "INVALID_ARGUMENT", "PERMISSION_DENIED")
