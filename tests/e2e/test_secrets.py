"""Secrets never leave the secret store: not in responses, audit events, task results or log lines."""

from __future__ import annotations

import json

import pytest
import redis

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack


def test_a_secret_appears_nowhere(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    secret = f"sk-live-{tenant}-0123456789abcdef"
    seen: list[str] = []
    with stack.client(tenant) as api:
        vault = {"type": "api_key", "value": secret, "hosts": [third_party.origin]}
        seen.append(api.put("/v1/credentials/vault", json=vault).text)
        seen.append(api.get("/v1/credentials").text)
        seen.append(
            api.post(
                "/v1/tools",
                json={
                    "tool_id": "secure",
                    "name": "S",
                    "endpoint": f"{third_party.base_url}/secure",
                    "method": "POST",
                    "auth": "api_key",
                    "credential": "vault",
                },
            ).text
        )
        seen.append(api.post("/v1/tools/secure/invoke", json={"arguments": {}}).text)
        agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["secure", "http_request"]}).json()["id"]
        plan = {
            "plan": [
                {"id": "s1", "tool": "secure", "arguments": {}},
                {
                    "id": "s2",
                    "tool": "http_request",
                    "arguments": {"url": f"{third_party.base_url}/status/401", "credential": "vault"},
                },
            ]
        }
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        with api.stream("GET", f"/v1/tasks/{task_id}/events") as events:
            seen.append("".join(events.iter_text()))
        seen.append(api.get(f"/v1/tasks/{task_id}").text)
        seen.append(api.get("/v1/audit").text)
        # A bad credential body must not be echoed back in the error either.
        seen.append(api.put("/v1/credentials/vault", json={"type": "api_key", "value": secret, "bogus": secret}).text)
        seen.append(api.put("/v1/credentials/vault", json={"type": "api_key", "value": [secret]}).text)
    # The third party did receive it: the feature works, and the checks below are not vacuous.
    assert third_party.requests_to("/secure")[-1].headers["Authorization"] == f"Bearer {secret}"
    assert json.loads(seen[-3])["events"], "audit is empty"
    for text in seen:
        assert secret not in text
    assert secret not in stack.logs()
    assert tenant in stack.logs(), "logs carry tenant labels"


@pytest.mark.parametrize("stack", ["redis"], indirect=True)
def test_secrets_are_encrypted_in_redis(stack: Stack, tenant: str, redis_url: str) -> None:
    assert stack.mode == "redis"
    secret = f"redis-visible-{tenant}"
    with stack.client(tenant) as api:
        assert api.put("/v1/credentials/r", json={"type": "api_key", "value": secret}).status_code == 201
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"altan:{tenant}:*"))
    assert keys, "the stack keeps its state in Redis under the tenant's prefix"
    for key in keys:
        if client.type(key) == b"hash":
            for value in client.hgetall(key).values():
                assert secret.encode() not in value


def test_credential_values_must_be_header_safe(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        for value in ("sk-\u0000abc", "sk-\u000babc", "sk-é"):
            answer = api.put("/v1/credentials/c", json={"type": "api_key", "value": value})
            assert answer.status_code == 400 and value not in answer.text
