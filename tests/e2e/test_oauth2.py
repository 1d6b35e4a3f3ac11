"""OAuth2 credentials through the real stack, against the fake provider on a real socket (tests/fakes/oauth2.py).

The browser is played by hand: the test reads the authorization URL, asks the provider for consent (which redirects
with a code), and follows that redirect to the gateway's callback, without a bearer token. A second integrator
process on the same state (another replica) shows that one refresh serves both.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from altan.v1 import integrator_pb2, integrator_pb2_grpc
from tests.e2e.stack import Stack, free_port
from tests.fakes.oauth2 import FakeOAuth2Provider

ROOT = Path(__file__).resolve().parents[2]
REPLICA_STATE_TTL = 0.3  # seconds a state lives on the second replica: its expiry is tested without a clock


def callback_url(stack: Stack) -> str:
    return f"{stack.base_url}/v1/oauth2/callback"


def spec(stack: Stack, provider: FakeOAuth2Provider, client_id: str, secret: str) -> dict[str, Any]:
    base = provider.base_url
    return {
        "type": "oauth2",
        "client_id": client_id,
        "client_secret": secret,
        "authorize_url": f"{base}/authorize",
        "token_url": f"{base}/token",
        "revoke_url": f"{base}/revoke",
        "scopes": ["read"],
        "redirect_uri": callback_url(stack),
    }


def consent(authorization_url: str) -> str:
    """The user's browser at the provider: where it is redirected to (the callback, with code and state)."""
    answer = httpx.get(authorization_url, follow_redirects=False, trust_env=False, timeout=10)
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


class Connected:
    """An oauth2 credential authorized through the stack, and a custom tool that uses it."""

    def __init__(self, stack: Stack, tenant: str, provider: FakeOAuth2Provider, name: str = "crm") -> None:
        self.stack, self.tenant, self.provider, self.name = stack, tenant, provider, name
        self.client_id = f"client-{uuid.uuid4().hex[:10]}"
        self.client_secret = f"cs-{uuid.uuid4().hex}"
        provider.register(self.client_id, self.client_secret, callback_url(stack))
        self.api = stack.client(tenant)
        answer = self.api.put(f"/v1/credentials/{name}", json=spec(stack, provider, self.client_id, self.client_secret))
        assert answer.status_code == 201 and answer.json()["status"] == "pending", answer.text
        tool = {
            "tool_id": f"{name}_me",
            "name": "Who am I",
            "endpoint": f"{provider.base_url}/api/me",
            "method": "GET",
            "auth": "oauth2",
            "credential": name,
        }
        assert self.api.post("/v1/tools", json=tool).status_code == 201
        self.redirect = self.authorize()
        finished = httpx.get(self.redirect, trust_env=False, timeout=30)  # no Authorization header: a browser
        assert finished.status_code == 200, finished.text
        assert finished.json() == {"credential": name, "status": "connected"}

    def authorize(self) -> str:
        answer = self.api.post(f"/v1/credentials/{self.name}/authorize")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert set(body) == {"authorization_url", "state"}
        query = {k: v[0] for k, v in parse_qs(urlsplit(body["authorization_url"]).query).items()}
        assert query["state"] == body["state"] and query["redirect_uri"] == callback_url(self.stack)
        assert query["code_challenge_method"] == "S256" and "code_verifier" not in query
        location = consent(body["authorization_url"])
        assert location.startswith(callback_url(self.stack) + "?")
        return location

    def invoke(self) -> httpx.Response:
        return self.api.post(f"/v1/tools/{self.name}_me/invoke", json={"arguments": {}})

    def status(self) -> str:
        return str(self.api.get(f"/v1/credentials/{self.name}").json()["status"])

    def audit(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.api.get("/v1/audit").json()["events"] if e["action"] == action]

    def tokens(self) -> list[str]:
        """Every token the provider issued this credential's client (access and refresh)."""
        return self.provider.tokens_of(self.client_id)

    def __enter__(self) -> Connected:
        return self

    def __exit__(self, *exc: object) -> None:
        self.api.close()


@pytest.fixture
def oauth2(stack: Stack, tenant: str, oauth2_provider: FakeOAuth2Provider) -> Iterator[Connected]:
    oauth2_provider.expires_in, oauth2_provider.refresh_delay = 3600, 0.0
    with Connected(stack, tenant, oauth2_provider) as connected:
        yield connected


def test_the_flow_connects_and_a_tool_calls_with_the_bearer_token(oauth2: Connected) -> None:
    answer = oauth2.invoke()
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"output": {"user": "ada", "plan": "gold"}, "status": 200}
    sent = oauth2.provider.resource_calls[-1]
    assert oauth2.provider.live_access_token(sent)
    assert oauth2.status() == "connected"
    assert [e["outcome"] for e in oauth2.audit("oauth2.authorize")] == ["ok"]
    assert [e["outcome"] for e in oauth2.audit("oauth2.callback")] == ["ok"]
    # No secret anywhere the tenant or the operator reads: answers, audit, logs.
    seen = [
        oauth2.api.get(f"/v1/credentials/{oauth2.name}").text,
        oauth2.api.get("/v1/credentials").text,
        oauth2.api.get("/v1/audit").text,
        oauth2.stack.logs(),
        answer.text,
    ]
    secrets = [oauth2.client_secret, *oauth2.tokens()]
    assert len(secrets) >= 3
    for text in seen:
        for secret in secrets:
            assert secret not in text


def test_a_state_works_once(oauth2: Connected) -> None:
    before = oauth2.api.get(f"/v1/credentials/{oauth2.name}").json()
    again = httpx.get(oauth2.redirect, trust_env=False, timeout=10)
    assert again.status_code == 400 and "state" in again.json()["error"]["message"]
    for query in ("?code=x&state=never-issued", "?code=x", "?state=" + "y" * 600):
        answer = httpx.get(callback_url(oauth2.stack) + query, trust_env=False, timeout=10)
        assert answer.status_code == 400, (query, answer.text)
    assert oauth2.api.get(f"/v1/credentials/{oauth2.name}").json() == before
    assert oauth2.invoke().status_code == 200


def test_a_token_about_to_expire_is_refreshed_before_the_call(
    stack: Stack, tenant: str, oauth2_provider: FakeOAuth2Provider
) -> None:
    oauth2_provider.expires_in, oauth2_provider.refresh_delay = 30, 0.0  # under the 60 s margin from the start
    with Connected(stack, tenant, oauth2_provider) as connected:
        oauth2_provider.expires_in = 3600
        before = oauth2_provider.refreshes()
        answer = connected.invoke()
        assert answer.status_code == 200, answer.text
        assert oauth2_provider.refreshes() - before == 1
        assert oauth2_provider.live_access_token(oauth2_provider.resource_calls[-1])
        assert [e["outcome"] for e in connected.audit("oauth2.refresh")] == ["ok"]
        assert connected.invoke().status_code == 200 and oauth2_provider.refreshes() - before == 1


def test_a_401_refreshes_once_and_the_call_is_retried(oauth2: Connected) -> None:
    provider = oauth2.provider
    assert oauth2.invoke().status_code == 200
    stale = provider.resource_calls[-1]
    provider.expire_access_tokens()
    before = provider.refreshes()
    answer = oauth2.invoke()
    assert answer.status_code == 200 and answer.json()["status"] == 200, answer.text
    assert provider.refreshes() - before == 1
    assert provider.resource_calls[-2:][0] == stale and provider.live_access_token(provider.resource_calls[-1])


def test_a_refused_refresh_needs_reauthorization_which_works(oauth2: Connected) -> None:
    provider = oauth2.provider
    provider.revoke_everything()
    provider.expire_access_tokens()
    answer = oauth2.invoke()
    assert answer.status_code == 400 and "needs re-authorization" in answer.json()["error"]["message"], answer.text
    assert oauth2.status() == "needs_reauth"
    assert [e["outcome"] for e in oauth2.audit("oauth2.refresh")] == ["error"]
    finished = httpx.get(oauth2.authorize(), trust_env=False, timeout=30)
    assert finished.status_code == 200, finished.text
    assert oauth2.status() == "connected" and oauth2.invoke().status_code == 200


def test_delete_revokes_the_refresh_token_at_the_provider(oauth2: Connected) -> None:
    assert oauth2.invoke().status_code == 200
    tokens = oauth2.tokens()
    assert oauth2.api.delete(f"/v1/credentials/{oauth2.name}").status_code == 204
    revoked = [(t, hint) for t, hint in oauth2.provider.revocations if t in tokens]
    assert len(revoked) == 1 and revoked[0][1] == "refresh_token"
    assert [e["outcome"] for e in oauth2.audit("oauth2.revoke")] == ["ok"]
    assert oauth2.api.get(f"/v1/credentials/{oauth2.name}").status_code == 404


def test_a_member_cannot_authorize(oauth2: Connected) -> None:
    with oauth2.stack.client(oauth2.tenant, role="member") as member:
        answer = member.post(f"/v1/credentials/{oauth2.name}/authorize")
        assert answer.status_code == 403, answer.text
        assert member.get(f"/v1/credentials/{oauth2.name}").json()["status"] == "connected"


def test_the_public_grpc_port_authorizes_and_finishes(
    stack: Stack, tenant: str, oauth2_provider: FakeOAuth2Provider
) -> None:
    client_id, secret = f"client-{uuid.uuid4().hex[:10]}", f"cs-{uuid.uuid4().hex}"
    oauth2_provider.register(client_id, secret, callback_url(stack))
    with stack.client(tenant) as api:
        assert api.put("/v1/credentials/g", json=spec(stack, oauth2_provider, client_id, secret)).status_code == 201
    metadata = (("authorization", f"Bearer {stack.token(tenant)}"),)
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        integrator = integrator_pb2_grpc.IntegratorServiceStub(channel)
        started = integrator.AuthorizeCredential(
            integrator_pb2.AuthorizeCredentialRequest(name="g"), metadata=metadata, timeout=10
        )
        query = parse_qs(urlsplit(consent(started.authorization_url)).query)
        assert query["state"] == [started.state]
        request = integrator_pb2.FinishOAuth2Request(code=query["code"][0], state=started.state)
        finished = integrator.FinishOAuth2(request, timeout=10)  # no token: the state is the proof
        assert finished.credential == "g" and finished.status == integrator_pb2.CREDENTIAL_STATUS_CONNECTED
        with pytest.raises(grpc.RpcError) as again:
            integrator.FinishOAuth2(request, timeout=10)
        assert again.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as member:
            integrator.AuthorizeCredential(
                integrator_pb2.AuthorizeCredentialRequest(name="g"),
                metadata=(("authorization", f"Bearer {stack.token(tenant, role='member')}"),),
                timeout=10,
            )
        assert member.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as anonymous:  # tokenless is FinishOAuth2 only
            integrator.AuthorizeCredential(integrator_pb2.AuthorizeCredentialRequest(name="g"), timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- a second integrator replica ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replica(stack: Stack) -> Iterator[str]:
    """Another integrator process on the stack's state (the same Redis, when there is one) and keys; its address.

    Its states live REPLICA_STATE_TTL seconds."""
    port = free_port()
    env = {k: v for k, v in stack.env.items() if k != "ALTAN_INTEGRATOR_METRICS_PORT"}
    env.update(
        ALTAN_INTEGRATOR_PORT=str(port),
        ALTAN_TOOL_ADDR=f"127.0.0.1:{stack.internal_ports['tool']}",
        ALTAN_OAUTH2_STATE_TTL_SECONDS=str(REPLICA_STATE_TTL),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.integrator"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        yield address
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 0, output[-3000:]


@pytest.mark.parametrize("stack", ["redis"], indirect=True)  # replicas share their state through Redis
def test_two_replicas_refreshing_at_once_refresh_once(
    stack: Stack, tenant: str, oauth2_provider: FakeOAuth2Provider, replica: str, request: pytest.FixtureRequest
) -> None:
    assert stack.mode == "redis"
    oauth2_provider.expires_in, oauth2_provider.refresh_delay = 30, 0.0
    connected = Connected(stack, tenant, oauth2_provider)  # through the stack's integrator
    request.addfinalizer(connected.api.close)
    oauth2_provider.expires_in, oauth2_provider.refresh_delay = 3600, 0.5  # slow: both replicas ask meanwhile
    before, refused = oauth2_provider.refreshes(), oauth2_provider.invalid_grants
    metadata = (("authorization", f"Bearer {stack.token(tenant)}"),)

    def through_the_replica() -> int:
        with grpc.insecure_channel(replica) as channel:
            integrator = integrator_pb2_grpc.IntegratorServiceStub(channel)
            request = integrator_pb2.InvokeToolRequest(tool_id="crm_me", arguments_json=b"{}")
            return int(integrator.InvokeTool(request, metadata=metadata, timeout=20).http_status)

    try:
        with ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(through_the_replica), pool.submit(lambda: connected.invoke().status_code)]
            calls += [pool.submit(through_the_replica), pool.submit(lambda: connected.invoke().status_code)]
            assert [c.result() for c in calls] == [200, 200, 200, 200]
    finally:
        oauth2_provider.refresh_delay = 0.0
    assert oauth2_provider.refreshes() - before == 1
    assert oauth2_provider.invalid_grants == refused
    assert connected.status() == "connected"


def test_an_expired_state_is_refused(
    stack: Stack, tenant: str, oauth2_provider: FakeOAuth2Provider, replica: str
) -> None:
    client_id, secret = f"client-{uuid.uuid4().hex[:10]}", f"cs-{uuid.uuid4().hex}"
    oauth2_provider.register(client_id, secret, callback_url(stack))
    metadata = (("authorization", f"Bearer {stack.token(tenant)}"),)
    with grpc.insecure_channel(replica) as channel:
        integrator = integrator_pb2_grpc.IntegratorServiceStub(channel)
        put = integrator_pb2.PutCredentialRequest(name="late")
        put.credential.oauth2.CopyFrom(
            integrator_pb2.OAuth2Spec(
                client_id=client_id,
                client_secret=secret,
                authorize_url=f"{oauth2_provider.base_url}/authorize",
                token_url=f"{oauth2_provider.base_url}/token",
                redirect_uri=callback_url(stack),
            )
        )
        integrator.PutCredential(put, metadata=metadata, timeout=10)
        issued = time.monotonic()
        started = integrator.AuthorizeCredential(
            integrator_pb2.AuthorizeCredentialRequest(name="late"), metadata=metadata, timeout=10
        )
        code = parse_qs(urlsplit(consent(started.authorization_url)).query)["code"][0]
        # Past the state's life (a setting of this replica): time passing is what is tested, not a synchronisation.
        time.sleep(max(0.0, issued + REPLICA_STATE_TTL + 0.1 - time.monotonic()))
        with pytest.raises(grpc.RpcError) as expired:
            integrator.FinishOAuth2(integrator_pb2.FinishOAuth2Request(code=code, state=started.state), timeout=10)
        assert expired.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expired" in (expired.value.details() or "")
        got = integrator.GetCredential(integrator_pb2.GetCredentialRequest(name="late"), metadata=metadata, timeout=10)
        assert got.credential.status == integrator_pb2.CREDENTIAL_STATUS_PENDING
