"""API.md "Authentication", from outside: every bad token is a 401 that changes nothing; roles; tenancy."""

from __future__ import annotations

import time
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from altan.v1 import agent_pb2, agent_pb2_grpc, tool_pb2, tool_pb2_grpc
from tests.e2e.stack import JWT_SECRET, Stack


def _claims(tenant: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "tenant_id": tenant,
        "sub": "mallory",
        "role": "admin",
        "aud": "altan",
        "iss": "altan-dev",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _unsigned(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key=None, algorithm="none")  # type: ignore[arg-type]


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

BAD_TOKENS = {
    "missing": lambda t: None,
    "not bearer": lambda t: "Basic " + jwt.encode(_claims(t), JWT_SECRET, algorithm="HS256"),
    "garbage": lambda t: "Bearer not-a-jwt",
    "bad signature": lambda t: (
        "Bearer " + jwt.encode(_claims(t), "another-secret-another-secret-another!", algorithm="HS256")
    ),
    "alg none": lambda t: "Bearer " + _unsigned(_claims(t)),
    "expired": lambda t: "Bearer " + jwt.encode(_claims(t, exp=int(time.time()) - 3600), JWT_SECRET, algorithm="HS256"),
    "wrong aud": lambda t: "Bearer " + jwt.encode(_claims(t, aud="other"), JWT_SECRET, algorithm="HS256"),
    "wrong iss": lambda t: "Bearer " + jwt.encode(_claims(t, iss="evil"), JWT_SECRET, algorithm="HS256"),
    "no tenant": lambda t: "Bearer " + jwt.encode(_claims(t, tenant_id=None), JWT_SECRET, algorithm="HS256"),
    "no exp": lambda t: "Bearer " + jwt.encode(_claims(t, exp=None), JWT_SECRET, algorithm="HS256"),
    "not yet valid": lambda t: (
        "Bearer " + jwt.encode(_claims(t, nbf=int(time.time()) + 3600), JWT_SECRET, algorithm="HS256")
    ),
    "unknown role": lambda t: "Bearer " + jwt.encode(_claims(t, role="root"), JWT_SECRET, algorithm="HS256"),
    "HS512 not pinned": lambda t: "Bearer " + jwt.encode(_claims(t), JWT_SECRET, algorithm="HS512"),
    "RS256 not pinned": lambda t: "Bearer " + jwt.encode(_claims(t), RSA_KEY, algorithm="RS256"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_token_is_401_and_changes_nothing(stack: Stack, tenant: str, case: str) -> None:
    header = BAD_TOKENS[case](tenant)
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=stack.base_url, headers=headers, trust_env=False) as anonymous:
        answer = anonymous.post("/v1/agents", json={"name": "sneaky"})
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "UNAUTHENTICATED"
        assert anonymous.get("/v1/agents").status_code == 401
        # Even a malformed body is refused for the token first: nothing is parsed for an unknown caller.
        assert anonymous.post("/v1/agents", content=b"{nope").status_code == 401
    with stack.client(tenant) as client:
        assert client.get("/v1/agents").json()["agents"] == []


@pytest.mark.parametrize("service", ["agent", "tool", "integrator"])
def test_every_internal_service_checks_the_token_itself(stack: Stack, service: str) -> None:
    """A caller that skips the gateway meets the same check at each service."""
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.internal_ports[service]}")
    stub: Any
    if service == "agent":
        call = agent_pb2_grpc.AgentServiceStub(channel).ListAgents
        request: Any = agent_pb2.ListAgentsRequest()
    else:
        from altan.v1 import integrator_pb2, integrator_pb2_grpc

        if service == "tool":
            stub = tool_pb2_grpc.ToolServiceStub(channel)
            call, request = stub.ListTools, tool_pb2.ListToolsRequest()
        else:
            stub = integrator_pb2_grpc.IntegratorServiceStub(channel)
            call, request = stub.ListCredentials, integrator_pb2.ListCredentialsRequest()
    for metadata in ((), (("authorization", BAD_TOKENS["alg none"]("t-x")),)):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_member_reads_and_runs_but_cannot_change(stack: Stack, tenant: str) -> None:
    with stack.client(tenant, "admin") as admin, stack.client(tenant, "member") as member:
        agent = admin.post("/v1/agents", json={"name": "a", "tools": ["json_extract"]}).json()
        admin.post("/v1/tools", json={"tool_id": "t1", "name": "T", "endpoint": "https://example.com/x"})
        admin.put("/v1/credentials/c1", json={"type": "api_key", "value": "v"})
        forbidden = [
            member.post("/v1/agents", json={"name": "b"}),
            member.patch(f"/v1/agents/{agent['id']}", json={"name": "renamed"}),
            member.delete(f"/v1/agents/{agent['id']}"),
            member.post("/v1/tools", json={"tool_id": "t2", "name": "T", "endpoint": "https://example.com/x"}),
            member.delete("/v1/tools/t1"),
            member.put("/v1/credentials/c2", json={"type": "api_key", "value": "v"}),
            member.delete("/v1/credentials/c1"),
        ]
        for answer in forbidden:
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["code"] == "PERMISSION_DENIED"
        assert member.get(f"/v1/agents/{agent['id']}").json()["name"] == "a"
        assert [t["tool_id"] for t in member.get("/v1/tools").json()["tools"]].count("t1") == 1
        assert [c["name"] for c in member.get("/v1/credentials").json()["credentials"]] == ["c1"]
        plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"x": 1}, "path": "x"}}]}
        assert member.post(f"/v1/agents/{agent['id']}/tasks", json={"input": plan}).status_code == 202


def test_another_tenants_resources_are_404(stack: Stack, tenant: str) -> None:
    other = tenant + "-other"
    with stack.client(tenant) as owner, stack.client(other) as stranger:
        agent = owner.post("/v1/agents", json={"name": "a", "tools": ["json_extract"]}).json()
        owner.post("/v1/tools", json={"tool_id": "mine", "name": "T", "endpoint": "https://example.com/x"})
        owner.put("/v1/credentials/secret-one", json={"type": "api_key", "value": "v"})
        plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"x": 1}, "path": "x"}}]}
        task_id = owner.post(f"/v1/agents/{agent['id']}/tasks", json={"input": plan}).json()["task_id"]
        answers = [
            stranger.get(f"/v1/agents/{agent['id']}"),
            stranger.patch(f"/v1/agents/{agent['id']}", json={"name": "x"}),
            stranger.delete(f"/v1/agents/{agent['id']}"),
            stranger.post(f"/v1/agents/{agent['id']}/tasks", json={"input": plan}),
            stranger.get("/v1/tools/mine"),
            stranger.delete("/v1/tools/mine"),
            stranger.post("/v1/tools/mine/invoke", json={"arguments": {}}),
            stranger.delete("/v1/credentials/secret-one"),
            stranger.get(f"/v1/tasks/{task_id}"),
            stranger.get(f"/v1/tasks/{task_id}/events"),
            stranger.post(f"/v1/tasks/{task_id}/cancel"),
        ]
        for answer in answers:
            assert answer.status_code == 404, (answer.request.url, answer.text)
            assert answer.json()["error"]["code"] == "NOT_FOUND"
        assert stranger.get("/v1/agents").json()["agents"] == []
        assert stranger.get("/v1/credentials").json()["credentials"] == []
        assert "mine" not in [t["tool_id"] for t in stranger.get("/v1/tools").json()["tools"]]
        assert {e["tenant_id"] for e in stranger.get("/v1/audit").json()["events"]} <= {other}
        # The owner still has everything.
        assert owner.get(f"/v1/agents/{agent['id']}").status_code == 200
        assert owner.get("/v1/tools/mine").status_code == 200
