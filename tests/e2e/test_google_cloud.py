"""The stack on Google Cloud backends: credentials in Secret Manager, audit entries in Cloud Logging.

The real stack (``altan up``) runs with ``ALTAN_SECRET_BACKEND=gcp`` and ``ALTAN_AUDIT_SINK=gcp``; its integrator's
real Google clients reach an in-process fake of both APIs (tests/fakes/google_cloud.py) over a real gRPC channel.
Stopping the fake makes Google unreachable; its ``fail`` makes an RPC answer a status of our choosing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack, start_stack
from tests.fakes.google_cloud import FakeGoogleCloud


@pytest.fixture(scope="module")
def google() -> Iterator[FakeGoogleCloud]:
    with FakeGoogleCloud() as fake:
        yield fake


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-gcp")


@pytest.fixture(scope="module")
def gcp_stack(google: FakeGoogleCloud, third_party: FakeThirdParty, data_dir: Path) -> Iterator[Stack]:
    env = {
        "ALTAN_SECRET_BACKEND": "gcp",
        "ALTAN_AUDIT_SINK": "gcp",
        "ALTAN_GCP_PROJECT": "acme-prod",
        "ALTAN_GCP_EMULATOR_HOST": google.address,
        "ALTAN_GCP_TIMEOUT_SECONDS": "2",
    }
    running = start_stack(
        data_dir=data_dir, egress_allow=f"127.0.0.1:{third_party.port}", redis_url=None, extra_env=env
    )
    yield running
    assert running.stop() == 0, running.logs()[-5000:]


@pytest.fixture
def healthy(google: FakeGoogleCloud) -> Iterator[FakeGoogleCloud]:
    """The fake up and answering, whatever the test before did to it; and so again after the test."""
    yield google
    google.secret_manager.fail.clear()
    google.logging.fail.clear()
    if not google.serving:
        google.start()


def _tool(api: httpx.Client, third_party: FakeThirdParty, tool_id: str, credential: str) -> None:
    spec = {
        "tool_id": tool_id,
        "name": tool_id,
        "endpoint": f"{third_party.base_url}/{tool_id}",
        "method": "POST",
        "auth": "api_key",
        "credential": credential,
    }
    assert api.post("/v1/tools", json=spec).status_code == 201


def _entries(google: FakeGoogleCloud, tenant: str) -> list[dict[str, Any]]:
    return [dict(e.json_payload) for e in google.logging.entries if e.labels["altan_tenant"] == tenant]


def _secret_of(google: FakeGoogleCloud, tenant: str, name: str) -> Any:
    (found,) = [
        s
        for s in google.secret_manager.secrets.values()
        if s.secret.annotations["altan.io/tenant"] == tenant and s.secret.annotations["altan.io/credential"] == name
    ]
    return found


def test_a_credential_lives_in_secret_manager_and_reaches_its_tool(
    gcp_stack: Stack, healthy: FakeGoogleCloud, tenant: str, third_party: FakeThirdParty, data_dir: Path
) -> None:
    google = healthy
    secret = f"sk-live-{tenant}-in-google"
    with gcp_stack.client(tenant) as api:
        answer = api.put("/v1/credentials/crm", json={"type": "api_key", "value": secret, "prefix": ""})
        assert answer.status_code == 201 and secret not in answer.text
        stored = _secret_of(google, tenant, "crm")
        assert stored.secret.labels["altan-tenant"] == tenant and stored.secret.labels["managed-by"] == "altan"
        assert secret.encode() in stored.versions[-1][1]
        _tool(api, third_party, "gcp_lookup", "crm")
        invoked = api.post("/v1/tools/gcp_lookup/invoke", json={"arguments": {}})
        assert invoked.status_code == 200, invoked.text
        assert third_party.requests_to("/gcp_lookup")[-1].headers["Authorization"] == secret

        replaced = api.put("/v1/credentials/crm", json={"type": "api_key", "value": secret + "-2", "prefix": ""})
        assert replaced.status_code == 200
        assert [state for state, _ in google.secret_manager.payloads(stored.secret.name.rsplit("/", 1)[1])] == [
            "DESTROYED",
            "ENABLED",
        ]
        api.post("/v1/tools/gcp_lookup/invoke", json={"arguments": {}})
        assert third_party.requests_to("/gcp_lookup")[-1].headers["Authorization"] == secret + "-2"

        entries = _entries(google, tenant)
        calls = [(e["action"], e["outcome"], e["credential"]) for e in entries if e["action"] == "tool.invoke"]
        assert calls == [("tool.invoke", "started", "crm"), ("tool.invoke", "ok", "crm")] * 2
        assert {"credential.put"} <= {e["action"] for e in entries}
        assert api.delete("/v1/credentials/crm").status_code == 204
        assert not [s for s in google.secret_manager.secrets.values() if s.secret.labels.get("altan-tenant") == tenant]
    everything = "".join(p.read_text(errors="replace") for p in data_dir.rglob("*") if p.is_file())
    assert secret not in everything and secret not in json.dumps(_entries(google, tenant))
    assert secret not in gcp_stack.logs()


def test_unreachable_google_is_a_503_and_nothing_falls_back_to_local_secrets(
    gcp_stack: Stack, healthy: FakeGoogleCloud, tenant: str, third_party: FakeThirdParty
) -> None:
    google = healthy
    with gcp_stack.client(tenant) as api:
        assert api.put("/v1/credentials/crm", json={"type": "api_key", "value": "sk-before"}).status_code == 201
        _tool(api, third_party, "gcp_down", "crm")
        agent = api.post("/v1/agents", json={"name": "a", "tools": ["gcp_down"]}).json()["id"]
        google.stop()
        answer = api.put("/v1/credentials/later", json={"type": "api_key", "value": "sk-during-outage"})
        assert answer.status_code == 503, answer.text
        assert int(answer.headers["Retry-After"]) >= 1
        assert answer.json()["error"] == {
            "code": "UNAVAILABLE",
            "message": "storing credential 'later' in Secret Manager: Google Cloud is unreachable",
        }
        assert api.get("/v1/credentials/later").status_code == 404, "not stored anywhere else either"
        before = len(third_party.requests_to("/gcp_down"))
        invoked = api.post("/v1/tools/gcp_down/invoke", json={"arguments": {}})
        assert invoked.status_code == 503 and "Google Cloud is unreachable" in invoked.json()["error"]["message"]
        task = api.post(f"/v1/agents/{agent}/tasks", json={"input": {"plan": [{"id": "s1", "tool": "gcp_down"}]}})
        with api.stream("GET", f"/v1/tasks/{task.json()['task_id']}/events") as events:
            "".join(events.iter_text())
        failed = api.get(f"/v1/tasks/{task.json()['task_id']}").json()
        assert failed["status"] == "failed" and "Google Cloud is unreachable" in failed["steps"][0]["error"]
        assert len(third_party.requests_to("/gcp_down")) == before, "no call ran"

        google.start()  # back, but Secret Manager alone answers UNAVAILABLE: the read of the secret is what fails
        google.secret_manager.fail["AccessSecretVersion"] = grpc.StatusCode.UNAVAILABLE
        invoked = api.post("/v1/tools/gcp_down/invoke", json={"arguments": {}})
        assert invoked.status_code == 503
        message = invoked.json()["error"]["message"]
        assert message == "reading credential 'crm' from Secret Manager: Google Cloud is unreachable"
        google.secret_manager.fail.clear()
        assert api.post("/v1/tools/gcp_down/invoke", json={"arguments": {}}).status_code == 200
        assert third_party.requests_to("/gcp_down")[-1].headers["Authorization"] == "Bearer sk-before"


def test_a_refused_identity_names_the_missing_permission(
    gcp_stack: Stack, healthy: FakeGoogleCloud, tenant: str
) -> None:
    healthy.secret_manager.fail["AddSecretVersion"] = grpc.StatusCode.PERMISSION_DENIED
    with gcp_stack.client(tenant) as api:
        answer = api.put("/v1/credentials/crm", json={"type": "api_key", "value": "sk-refused"})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "30"
    message = answer.json()["error"]["message"]
    assert "refused the integrator's service account (PERMISSION_DENIED)" in message
    assert "secretmanager.versions.add" in message and "sk-refused" not in message


def test_a_call_whose_audit_entry_cannot_be_written_does_not_run(
    gcp_stack: Stack, healthy: FakeGoogleCloud, tenant: str, third_party: FakeThirdParty
) -> None:
    with gcp_stack.client(tenant) as api:
        assert api.put("/v1/credentials/crm", json={"type": "api_key", "value": "sk-audited"}).status_code == 201
        _tool(api, third_party, "gcp_audited", "crm")
        healthy.logging.fail["WriteLogEntries"] = grpc.StatusCode.PERMISSION_DENIED
        answer = api.post("/v1/tools/gcp_audited/invoke", json={"arguments": {}})
        assert answer.status_code == 503, answer.text
        message = answer.json()["error"]["message"]
        assert message.startswith("the audit trail cannot be written, so the call was not run")
        assert "roles/logging.logWriter" in message
        assert third_party.requests_to("/gcp_audited") == []
        (event,) = api.get("/v1/audit", params={"limit": 1}).json()["events"]
        assert (event["tool_id"], event["outcome"]) == ("gcp_audited", "error")
        healthy.logging.fail.clear()
        assert api.post("/v1/tools/gcp_audited/invoke", json={"arguments": {}}).status_code == 200
        assert len(third_party.requests_to("/gcp_audited")) == 1
