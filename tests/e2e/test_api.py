"""The REST resources of API.md, driven as a tenant would."""

from __future__ import annotations

import json
import time

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack

LLM = {
    "llm_id": "gpt-4o",
    "provider": "openai",
    "endpoint": "https://api.openai.com/v1/chat/completions",
    "auth": {"type": "api_key", "credential": "openai"},
    "parameters": {"max_tokens": 4096, "temperature": 0.7},
}


def test_agent_lifecycle(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        created = api.post(
            "/v1/agents",
            json={
                "name": "triage",
                "instructions": "be brief",
                "llm": LLM,
                "fallback_llms": [LLM],
                "tools": ["parse_email"],
            },
        )
        assert created.status_code == 201, created.text
        agent = created.json()
        assert agent["id"].startswith("agt_")
        assert agent["llm"] == LLM and agent["fallback_llms"] == [LLM] and agent["tools"] == ["parse_email"]
        assert api.get(f"/v1/agents/{agent['id']}").json() == agent

        patched = api.patch(f"/v1/agents/{agent['id']}", json={"name": "triage-2", "tools": []})
        assert patched.status_code == 200
        assert patched.json()["name"] == "triage-2" and patched.json()["tools"] == []
        assert patched.json()["instructions"] == "be brief"

        assert api.delete(f"/v1/agents/{agent['id']}").status_code == 204
        assert api.get(f"/v1/agents/{agent['id']}").status_code == 404
        assert api.delete(f"/v1/agents/{agent['id']}").status_code == 404


def test_agent_list_pages(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        ids = [api.post("/v1/agents", json={"name": f"a{i}"}).json()["id"] for i in range(5)]
        first = api.get("/v1/agents", params={"page_size": 2}).json()
        assert len(first["agents"]) == 2 and first["next_page_token"]
        seen = [a["id"] for a in first["agents"]]
        token = first["next_page_token"]
        while token:
            page = api.get("/v1/agents", params={"page_size": 2, "page_token": token}).json()
            seen += [a["id"] for a in page["agents"]]
            token = page.get("next_page_token")
        assert seen == ids
        assert "next_page_token" not in api.get("/v1/agents").json()


def test_agent_validation(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        bad = [
            {},
            {"name": ""},
            {"name": 5},
            {"name": "a", "tools": ["no_such_tool"]},
            {"name": "a", "tools": "parse_email"},
            {"name": "a", "llm": {**LLM, "provider": "cohere"}},
            {"name": "a", "llm": {**LLM, "endpoint": "ftp://x"}},
            {"name": "a", "surprise": True},
        ]
        for body in bad:
            answer = api.post("/v1/agents", json=body)
            assert answer.status_code == 400, (body, answer.text)
            assert answer.json()["error"]["code"] == "INVALID_ARGUMENT"
        assert "no_such_tool" in api.post("/v1/agents", json={"name": "a", "tools": ["no_such_tool"]}).text
        assert api.get("/v1/agents").json()["agents"] == []


def test_builtin_tools_are_listed_with_schemas(stack: Stack, tenant: str) -> None:
    with stack.client(tenant, "member") as api:
        tools = {t["tool_id"]: t for t in api.get("/v1/tools").json()["tools"]}
        for builtin in ("http_request", "parse_email", "json_extract", "text_template"):
            assert tools[builtin]["type"] == "builtin"
            assert tools[builtin]["input_schema"]["type"] == "object"
        assert api.get("/v1/tools/parse_email").json()["input_schema"] == tools["parse_email"]["input_schema"]


def test_custom_tool_forms_and_conflicts(stack: Stack, tenant: str) -> None:
    seed = {
        "tool_id": "slack_notify",
        "name": "Send Slack Notification",
        "description": "posts a message",
        "parameters": [
            {"name": "channel_id", "type": "string", "required": True, "description": "where"},
            {"name": "text", "type": "string", "required": True},
        ],
        "endpoint": "https://slack.com/api/chat.postMessage",
        "method": "POST",
        "auth": "api_key",
        "credential": "slack",
    }
    schema_form = {
        "tool_id": "lookup",
        "name": "Lookup",
        "endpoint": "https://api.example.com/items/{item}",
        "method": "GET",
        "input_schema": {
            "type": "object",
            "properties": {"item": {"type": "string"}, "n": {"type": "integer"}},
            "required": ["item"],
        },
    }
    with stack.client(tenant) as api:
        created = api.post("/v1/tools", json=seed)
        assert created.status_code == 201, created.text
        schema = created.json()["input_schema"]
        assert schema["required"] == ["channel_id", "text"]
        assert schema["properties"]["channel_id"]["type"] == "string"
        assert api.post("/v1/tools", json=schema_form).status_code == 201
        assert api.get("/v1/tools/lookup").json()["input_schema"]["properties"]["n"] == {"type": "integer"}

        duplicate = api.post("/v1/tools", json=seed)
        assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "ALREADY_EXISTS"
        assert api.post("/v1/tools", json={**seed, "tool_id": "parse_email"}).status_code == 409

        for bad in (
            {**seed, "tool_id": "Bad Id"},
            {**seed, "endpoint": "file:///etc/passwd"},
            {**seed, "method": "TRACE"},
            {**seed, "parameters": [{"name": "x", "type": "banana"}]},
            {**schema_form, "tool_id": "both", "parameters": []},
            {**schema_form, "tool_id": "remote", "input_schema": {"$ref": "https://evil.example/schema.json"}},
            {**seed, "tool_id": "nocred", "credential": None},
        ):
            answer = api.post("/v1/tools", json={k: v for k, v in bad.items() if v is not None})
            assert answer.status_code == 400, (bad, answer.text)

        assert api.delete("/v1/tools/lookup").status_code == 204
        assert api.get("/v1/tools/lookup").status_code == 404
        assert api.delete("/v1/tools/parse_email").status_code == 403  # platform-owned


def test_credentials_are_metadata_only(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        first = api.put("/v1/credentials/slack", json={"type": "api_key", "value": "xoxb-first-value"})
        assert first.status_code == 201
        assert first.json()["header"] == "Authorization" and first.json()["prefix"] == "Bearer "
        again = api.put(
            "/v1/credentials/slack",
            json={"type": "api_key", "value": "xoxb-second", "header": "X-Api-Key", "prefix": ""},
        )
        assert again.status_code == 200 and again.json()["header"] == "X-Api-Key"
        listed = api.get("/v1/credentials").json()["credentials"]
        assert [c["name"] for c in listed] == ["slack"]
        assert "value" not in json.dumps(listed) and "xoxb" not in json.dumps(listed)
        for bad in (
            {"type": "api_key"},
            {"type": "password", "value": "x"},
            {"type": "api_key", "value": 5},
            {"type": "api_key", "value": "x", "header": "bad header"},
        ):
            answer = api.put("/v1/credentials/other", json=bad)
            assert answer.status_code == 400, answer.text
        assert api.put("/v1/credentials/bad%20name", json={"type": "api_key", "value": "x"}).status_code == 400
        assert api.delete("/v1/credentials/slack").status_code == 204
        assert api.delete("/v1/credentials/slack").status_code == 404
        assert api.get("/v1/credentials").json()["credentials"] == []


def test_invoke_custom_tool_injects_the_credential(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    secret = f"key-{tenant}-do-not-leak"
    with stack.client(tenant) as api:
        api.put("/v1/credentials/crm", json={"type": "api_key", "value": secret, "header": "X-Api-Key", "prefix": ""})
        api.post(
            "/v1/tools",
            json={
                "tool_id": "crm_update",
                "name": "CRM",
                "endpoint": f"{third_party.base_url}/crm/{tenant}/{{record}}",
                "method": "PATCH",
                "auth": "api_key",
                "credential": "crm",
                "parameters": [
                    {"name": "record", "type": "string", "required": True},
                    {"name": "stage", "type": "string", "required": True},
                ],
            },
        )
        answer = api.post("/v1/tools/crm_update/invoke", json={"arguments": {"record": "r/../1?x", "stage": "won"}})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == 200
        assert body["output"]["method"] == "PATCH" and body["output"]["json"] == {"stage": "won"}
        assert body["output"]["authenticated"] is True
        # The placeholder is one path segment, however it is spelled.
        assert body["output"]["path"] == f"/crm/{tenant}/r%2F..%2F1%3Fx"
        seen = third_party.requests_to(f"/crm/{tenant}/r%2F..%2F1%3Fx")
        assert seen and seen[-1].headers["X-Api-Key"] == secret
        assert secret not in answer.text


def test_invoke_get_tool_sends_query_and_validates(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    with stack.client(tenant) as api:
        api.post(
            "/v1/tools",
            json={
                "tool_id": "search",
                "name": "Search",
                "endpoint": f"{third_party.base_url}/search-{tenant}",
                "method": "GET",
                "parameters": [{"name": "q", "type": "string", "required": True}, {"name": "limit", "type": "integer"}],
            },
        )
        ok = api.post("/v1/tools/search/invoke", json={"arguments": {"q": "cats", "limit": 3}})
        assert ok.status_code == 200
        assert ok.json()["output"]["query"] == {"q": ["cats"], "limit": ["3"]}
        before = len(third_party.requests_to(f"/search-{tenant}"))
        for args in ({}, {"q": 5}, {"q": "x", "limit": "many"}, {"q": "x", "extra": 1}):
            answer = api.post("/v1/tools/search/invoke", json={"arguments": args})
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == "INVALID_ARGUMENT"
        assert api.post("/v1/tools/search/invoke", json={"arguments": []}).status_code == 400
        # Invalid arguments never reach the third party.
        assert len(third_party.requests_to(f"/search-{tenant}")) == before


def test_http_request_builtin_with_credential(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    with stack.client(tenant) as api:
        api.put(
            "/v1/credentials/svc",
            json={"type": "api_key", "value": f"tok-{tenant}", "hosts": [third_party.origin]},
        )
        answer = api.post(
            "/v1/tools/http_request/invoke",
            json={
                "arguments": {
                    "url": f"{third_party.base_url}/raw-{tenant}",
                    "method": "POST",
                    "json": {"a": [1, 2]},
                    "credential": "svc",
                }
            },
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"]["json"] == {"a": [1, 2]}
        assert third_party.requests_to(f"/raw-{tenant}")[-1].headers["Authorization"] == f"Bearer tok-{tenant}"
        missing = api.post(
            "/v1/tools/http_request/invoke",
            json={"arguments": {"url": f"{third_party.base_url}/raw", "credential": "nope"}},
        )
        assert missing.status_code == 400 and "nope" in missing.json()["error"]["message"]


def test_transient_failures_are_retried(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    with stack.client(tenant) as api:
        answer = api.post(
            "/v1/tools/http_request/invoke", json={"arguments": {"url": f"{third_party.base_url}/flaky/{tenant}/2"}}
        )
        assert answer.status_code == 200
        assert answer.json() == {"output": {"attempts": 3}, "status": 200}
        # A non-transient error is answered as the third party gave it, without retries.
        answer = api.post(
            "/v1/tools/http_request/invoke", json={"arguments": {"url": f"{third_party.base_url}/status/404"}}
        )
        assert answer.json()["status"] == 404


def test_retry_after_is_honoured(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    with stack.client(tenant) as api:
        started = time.monotonic()
        answer = api.post(
            "/v1/tools/http_request/invoke", json={"arguments": {"url": f"{third_party.base_url}/flaky/{tenant}/1/1"}}
        )
        elapsed = time.monotonic() - started
        assert answer.json() == {"output": {"attempts": 2}, "status": 200}
        assert elapsed >= 0.9, "the retry did not wait the Retry-After the third party asked for"


def test_unreachable_destination_is_503_after_retries(stack: Stack, tenant: str, closed_port: int) -> None:
    with stack.client(tenant) as api:
        answer = api.post(
            "/v1/tools/http_request/invoke", json={"arguments": {"url": f"http://127.0.0.1:{closed_port}/"}}
        )
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "UNAVAILABLE"
        event = api.get("/v1/audit").json()["events"][-1]
        assert event["outcome"] == "error" and event["tool_id"] == "http_request"


def test_builtin_text_tools(stack: Stack, tenant: str) -> None:
    raw = "From: Ann <ann@example.com>\r\nTo: bob@example.com\r\nSubject: Lunch\r\n\r\nNoon?\r\n"
    with stack.client(tenant) as api:
        email = api.post("/v1/tools/parse_email/invoke", json={"arguments": {"raw": raw}}).json()["output"]
        assert email["subject"] == "Lunch" and "Noon?" in email["text"]
        extracted = api.post(
            "/v1/tools/json_extract/invoke", json={"arguments": {"data": {"a": [{"b": 7}]}, "path": "a[0].b"}}
        ).json()
        assert extracted["output"]["value"] == 7
        text = api.post(
            "/v1/tools/text_template/invoke", json={"arguments": {"template": "hi {{ n }}", "values": {"n": "Ann"}}}
        ).json()
        assert text["output"]["text"] == "hi Ann"


def test_describe_by_ids_answers_unknown_tools(stack: Stack, tenant: str) -> None:
    """An agent naming a tool that does not exist is refused, and the message names that tool."""
    with stack.client(tenant) as api:
        api.post("/v1/tools", json={"tool_id": "exists", "name": "E", "endpoint": "https://example.com/e"})
        ok = api.post("/v1/agents", json={"name": "a", "tools": ["exists", "json_extract"]})
        assert ok.status_code == 201
        bad = api.post("/v1/agents", json={"name": "a", "tools": ["exists", "ghost", "json_extract"]})
        assert bad.status_code == 400 and "'ghost'" in bad.json()["error"]["message"]


def test_fallback_tool_runs_when_the_primary_stays_down(
    stack: Stack, tenant: str, third_party: FakeThirdParty, closed_port: int
) -> None:
    with stack.client(tenant) as api:
        api.post(
            "/v1/tools",
            json={
                "tool_id": "backup",
                "name": "B",
                "method": "GET",
                "endpoint": f"{third_party.base_url}/backup-{tenant}",
            },
        )
        api.post(
            "/v1/tools",
            json={
                "tool_id": "primary",
                "name": "P",
                "method": "GET",
                "fallback_tool_id": "backup",
                "endpoint": f"http://127.0.0.1:{closed_port}/primary",
            },
        )
        api.post(
            "/v1/tools",
            json={
                "tool_id": "flaky5xx",
                "name": "F",
                "method": "GET",
                "fallback_tool_id": "backup",
                "endpoint": f"{third_party.base_url}/status/500",
            },
        )
        api.post(
            "/v1/tools",
            json={
                "tool_id": "lonely",
                "name": "L",
                "method": "GET",
                "endpoint": f"http://127.0.0.1:{closed_port}/lonely",
            },
        )
        for tool in ("primary", "flaky5xx"):
            answer = api.post(f"/v1/tools/{tool}/invoke", json={"arguments": {}})
            assert answer.status_code == 200, answer.text
            assert answer.json()["output"]["path"] == f"/backup-{tenant}"
        assert api.post("/v1/tools/lonely/invoke", json={"arguments": {}}).status_code == 503
        audited = [(e["tool_id"], e["outcome"]) for e in api.get("/v1/audit").json()["events"]]
        assert audited[:4] == [("primary", "error"), ("backup", "ok"), ("flaky5xx", "error"), ("backup", "ok")]
        # For an agent, the fallback must be bound too.
        agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["primary"]}).json()["id"]
        plan = {"plan": [{"id": "s1", "tool": "primary", "arguments": {}}]}
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        with api.stream("GET", f"/v1/tasks/{task_id}/events") as events:
            "".join(events.iter_text())
        task = api.get(f"/v1/tasks/{task_id}").json()
        assert task["status"] == "failed" and "not bound" in task["error"]
