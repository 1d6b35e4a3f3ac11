"""services.integrator.oauth2 through the CredentialBroker, against the fake provider on a real socket: PKCE, the
one-time state, refresh ahead of expiry, one refresh across replicas (two brokers on two Redis connections), a
refused refresh, revocation; and never a secret in the store's clear text, an error or the audit trail.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis.asyncio as aioredis

from altan import context
from altan.api.credentials import parse_credential_spec
from altan.context import RequestContext
from altan.egress import EgressGuard, EgressPolicy
from altan.errors import EgressRefused, FailedPrecondition, InvalidArgument, PermissionDenied
from altan.outbound import GuardedHttpClient
from altan.store import MemoryBackend, RedisBackend, SharedStore, StateBackend, TenantStore
from services.integrator.audit import AuditLog
from services.integrator.credentials import CredentialBroker
from services.integrator.oauth2 import OAuth2Flows
from services.integrator.secrets import LocalSecretBackend
from tests.fakes.oauth2 import FakeOAuth2Provider, start_fake_oauth2_provider

REDIS_URL = "redis://127.0.0.1:6379/0"
MASTER = os.urandom(32)
REDIRECT = "https://altan.example/v1/oauth2/callback"


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeOAuth2Provider]:
    fake = start_fake_oauth2_provider()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@dataclass
class Clock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Replica:
    """One integrator's broker, as __main__ wires it."""

    backend: StateBackend
    broker: CredentialBroker
    audit: AuditLog
    http: GuardedHttpClient


@dataclass
class World:
    provider: FakeOAuth2Provider
    kind: str
    tenant: str
    clock: Clock
    replicas: list[Replica] = field(default_factory=list)
    client_secret: str = field(default_factory=lambda: "cs-" + uuid.uuid4().hex)

    @property
    def broker(self) -> CredentialBroker:
        return self.replicas[0].broker

    @property
    def audit(self) -> AuditLog:
        return self.replicas[0].audit

    def replica(self, *, allow_provider: bool = True, backend: StateBackend | None = None) -> Replica:
        if backend is None:
            if self.kind == "memory" and self.replicas:
                backend = self.replicas[0].backend  # one process: replicas share its memory
            else:
                backend = MemoryBackend(clock=self.clock) if self.kind == "memory" else RedisBackend(REDIS_URL)
        store = TenantStore(backend, "integrator")
        audit = AuditLog(store)
        policy = EgressPolicy.parse(f"127.0.0.1:{self.provider.port}" if allow_provider else "")
        http = GuardedHttpClient(EgressGuard(policy), max_redirects=0, timeout=10)
        secrets = LocalSecretBackend(store, MASTER)
        flows = OAuth2Flows(
            store, SharedStore(backend, "integrator"), secrets, http, audit, state_ttl_seconds=600, clock=self.clock
        )
        replica = Replica(backend, CredentialBroker(store, secrets, flows), audit, http)
        self.replicas.append(replica)
        return replica

    def spec(self, client_id: str, **changes: Any) -> dict[str, Any]:
        base = self.provider.base_url
        return {
            "type": "oauth2",
            "client_id": client_id,
            "client_secret": self.client_secret,
            "authorize_url": f"{base}/authorize",
            "token_url": f"{base}/token",
            "revoke_url": f"{base}/revoke",
            "scopes": ["read", "write"],
            "redirect_uri": REDIRECT,
        } | changes


def as_caller(tenant: str, role: str = "admin") -> None:
    context.bind(RequestContext(tenant_id=tenant, user="alice", role=role, token="t"))  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
async def world(request: pytest.FixtureRequest, provider: FakeOAuth2Provider) -> AsyncIterator[World]:
    provider.expires_in, provider.refresh_delay = 3600, 0.0
    w = World(provider, request.param, f"unit-oauth2-{uuid.uuid4().hex[:12]}", Clock())
    w.replica()
    as_caller(w.tenant)
    try:
        yield w
    finally:
        for replica in w.replicas:
            await replica.http.aclose()
            await replica.backend.aclose()
        if request.param == "redis":
            raw = aioredis.from_url(REDIS_URL)
            keys = [key async for key in raw.scan_iter(match=f"altan:{w.tenant}:*")]
            if keys:
                await raw.delete(*keys)
            await raw.aclose()


async def connect(w: World, name: str = "crm", **changes: Any) -> dict[str, str]:
    """Store the credential, authorize, consent at the provider, finish: what the callback's query held."""
    client_id = f"client-{uuid.uuid4().hex[:8]}"
    w.provider.register(client_id, w.client_secret, changes.get("redirect_uri", REDIRECT))
    await w.broker.put(name, parse_credential_spec(w.spec(client_id, **changes)))
    url, state = await w.broker.authorize(name)
    callback = consent(url)
    assert callback["state"] == state
    assert await w.broker.finish_oauth2(callback["code"], state) == name
    as_caller(w.tenant)
    return callback | {"client_id": client_id}


def consent(authorization_url: str) -> dict[str, str]:
    """The browser at the provider: the redirect's query (code and state)."""
    answer = httpx.get(authorization_url, follow_redirects=False, trust_env=False)
    assert answer.status_code == 302, answer.text
    location = answer.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def stored_secret(w: World, name: str = "crm") -> dict[str, Any]:
    raw = await LocalSecretBackend(TenantStore(w.replicas[0].backend, "integrator"), MASTER).get(name)
    assert raw is not None
    return dict(json.loads(raw))


async def everything_stored(w: World) -> str:
    """Every byte the state store holds for the tenant (and the tenantless OAuth2 states), as text."""
    backend = w.replicas[0].backend
    if isinstance(backend, MemoryBackend):
        return repr(vars(backend))
    raw = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        found = []
        for pattern in (f"altan:{w.tenant}:*", "altan::integrator:oauth2-state:*"):
            async for key in raw.scan_iter(match=pattern):
                kind = await raw.type(key)
                found.append(
                    key
                    + repr(await raw.hgetall(key) if kind == "hash" else await raw.get(key) if kind == "string" else "")
                )
        return "".join(found)
    finally:
        await raw.aclose()


# --- authorization ----------------------------------------------------------------------------------------------


async def test_the_authorization_url_carries_pkce_s256_state_and_the_exact_redirect_uri(world: World) -> None:
    w = world
    w.provider.register("cid", w.client_secret, REDIRECT)
    await w.broker.put("crm", parse_credential_spec(w.spec("cid")))
    url, state = await w.broker.authorize("crm")
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert url.startswith(f"{w.provider.base_url}/authorize?")
    assert query["response_type"] == "code" and query["client_id"] == "cid"
    assert query["redirect_uri"] == REDIRECT and query["state"] == state and query["scope"] == "read write"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert "code_verifier" not in query and w.client_secret not in url
    assert len(base64.urlsafe_b64decode(state + "==")) == 32
    stored = await everything_stored(w)
    assert state not in stored  # only its hash: whoever reads the store cannot finish the flow
    assert hashlib.sha256(state.encode()).hexdigest() in stored
    # Each authorization is its own: a new state and challenge.
    url2, state2 = await w.broker.authorize("crm")
    assert state2 != state and parse_qs(urlsplit(url2).query)["code_challenge"][0] != query["code_challenge"]


async def test_only_admins_authorize_and_only_oauth2_credentials(world: World) -> None:
    await world.broker.put("key", parse_credential_spec({"type": "api_key", "value": "sk-1"}))
    with pytest.raises(FailedPrecondition, match="not an oauth2 credential"):
        await world.broker.authorize("key")
    as_caller(world.tenant, role="member")
    with pytest.raises(PermissionDenied):
        await world.broker.authorize("key")


async def test_the_callback_exchanges_the_code_with_pkce_and_stores_the_tokens_encrypted(world: World) -> None:
    w = world
    await connect(w)
    meta = await w.broker.get("crm")
    assert meta["status"] == "connected"
    secret = await stored_secret(w)
    assert secret["access_token"].startswith("at-") and secret["refresh_token"].startswith("rt-")
    assert w.provider.live_access_token(secret["access_token"])
    resolved = await w.broker.resolve("crm")
    assert resolved.value == secret["access_token"] and resolved.prefix == "Bearer " and resolved.refreshable
    stored = await everything_stored(w)
    for value in (secret["access_token"], secret["refresh_token"], w.client_secret):
        assert value not in stored
    events = await w.audit.query("", 100)
    assert [e["action"] for e in events] == ["oauth2.authorize", "oauth2.callback"]
    assert all(e["outcome"] == "ok" and e["credential"] == "crm" for e in events)
    assert not any(v in json.dumps(events) for v in (secret["access_token"], secret["refresh_token"], w.client_secret))


async def test_a_state_works_once_even_when_two_callbacks_race(world: World) -> None:
    w = world
    w.provider.register("cid", w.client_secret, REDIRECT)
    await w.broker.put("crm", parse_credential_spec(w.spec("cid")))
    url, state = await w.broker.authorize("crm")
    code = consent(url)["code"]
    other = w.replica()  # another replica (in Redis mode: its own connection)

    async def finish(broker: CredentialBroker) -> str | Exception:
        try:
            return await broker.finish_oauth2(code, state)
        except InvalidArgument as exc:
            return exc

    outcomes = await asyncio.gather(finish(w.broker), finish(other.broker))
    assert sorted(type(o).__name__ for o in outcomes) == ["InvalidArgument", "str"]
    assert w.provider.grants.count("authorization_code") >= 1
    as_caller(w.tenant)
    with pytest.raises(InvalidArgument, match="unknown, already used or expired"):
        await w.broker.finish_oauth2(code, state)


async def test_an_unknown_state_changes_nothing(world: World) -> None:
    await connect(world)
    before = await stored_secret(world)
    for state in ("", "x" * 600, "nope", "A" * 43):
        with pytest.raises(InvalidArgument, match="state: unknown"):
            await world.broker.finish_oauth2("code", state)
    as_caller(world.tenant)
    assert await stored_secret(world) == before and (await world.broker.get("crm"))["status"] == "connected"


async def test_an_expired_state_is_refused(provider: FakeOAuth2Provider) -> None:
    clock = Clock()
    w = World(provider, "memory", f"unit-oauth2-{uuid.uuid4().hex[:12]}", clock)
    replica = w.replica(backend=MemoryBackend(clock=clock))
    as_caller(w.tenant)
    provider.register("cid-exp", w.client_secret, REDIRECT)
    await w.broker.put("crm", parse_credential_spec(w.spec("cid-exp")))
    url, state = await w.broker.authorize("crm")
    code = consent(url)["code"]
    clock.now += 601  # the state lived 600 s
    with pytest.raises(InvalidArgument, match="expired"):
        await w.broker.finish_oauth2(code, state)
    as_caller(w.tenant)
    assert (await w.broker.get("crm"))["status"] == "pending"
    await replica.http.aclose()


async def test_a_refused_code_marks_the_credential_error_and_says_so_without_secrets(world: World) -> None:
    w = world
    w.provider.register("cid", w.client_secret, REDIRECT)
    await w.broker.put("crm", parse_credential_spec(w.spec("cid")))
    _, state = await w.broker.authorize("crm")
    with pytest.raises(FailedPrecondition, match="'invalid_grant'") as caught:
        await w.broker.finish_oauth2("a-code-the-provider-never-issued", state)
    assert w.client_secret not in caught.value.message
    as_caller(w.tenant)
    assert (await w.broker.get("crm"))["status"] == "error"
    events = await w.audit.query("", 10)
    assert events[-1]["action"] == "oauth2.callback" and events[-1]["outcome"] == "error"
    # The user may deny consent: a clear refusal, the state spent.
    _, state = await w.broker.authorize("crm")
    with pytest.raises(FailedPrecondition, match="'access_denied' instead of a code"):
        await w.broker.finish_oauth2("", state, "access_denied")


async def test_the_token_endpoint_is_behind_the_egress_guard(world: World) -> None:
    w = world
    w.replica(allow_provider=False)
    w.replicas.insert(0, w.replicas.pop())  # the broker used below
    w.provider.register("cid", w.client_secret, REDIRECT)
    await w.broker.put("crm", parse_credential_spec(w.spec("cid")))
    url, state = await w.broker.authorize("crm")
    with pytest.raises(EgressRefused):
        await w.broker.finish_oauth2(consent(url)["code"], state)


# --- refresh ------------------------------------------------------------------------------------------------------


async def test_a_token_about_to_expire_is_refreshed_and_the_rotated_refresh_token_kept(world: World) -> None:
    w = world
    await connect(w)
    first = await stored_secret(w)
    w.clock.now += 3600 - 30  # 30 s left, under the 60 s margin
    resolved = await w.broker.resolve("crm")
    second = await stored_secret(w)
    assert w.provider.refreshes() >= 1 and resolved.value == second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]  # rotated, and persisted
    assert w.provider.live_access_token(resolved.value)
    assert (await w.audit.query("", 10))[-1]["action"] == "oauth2.refresh"
    w.clock.now += 60  # a fresh token is used as it is
    refreshes = w.provider.refreshes()
    assert (await w.broker.resolve("crm")).value == resolved.value and w.provider.refreshes() == refreshes


async def test_replicas_refreshing_at_once_refresh_once(world: World) -> None:
    """Two brokers (on two Redis connections in Redis mode) find the token expiring at the same moment: one
    refresh reaches the provider, and the other replica uses its result: no refresh token is ever sent twice."""
    w = world
    await connect(w)
    others = [w.replica() for _ in range(3)]
    w.clock.now += 3600 - 10
    w.provider.refresh_delay = 0.3  # a slow provider: every replica asks while the first refresh is under way
    before, refused = w.provider.refreshes(), w.provider.invalid_grants
    tokens = await asyncio.gather(w.broker.resolve("crm"), *(r.broker.resolve("crm") for r in others))
    assert w.provider.refreshes() - before == 1
    assert w.provider.invalid_grants == refused
    assert len({t.value for t in tokens}) == 1 and w.provider.live_access_token(tokens[0].value)
    assert (await w.broker.get("crm"))["status"] == "connected"


async def test_a_token_the_third_party_refuses_is_refreshed_once(world: World) -> None:
    w = world
    await connect(w)
    stale = (await w.broker.resolve("crm")).value
    w.provider.expire_access_tokens()
    before = w.provider.refreshes()
    fresh = await asyncio.gather(*(w.broker.refresh("crm", stale=stale) for _ in range(3)))
    assert w.provider.refreshes() - before == 1 and len({f.value for f in fresh}) == 1
    assert w.provider.live_access_token(fresh[0].value)


async def test_a_refused_refresh_needs_reauthorization_which_works(world: World) -> None:
    w = world
    await connect(w)
    w.provider.revoke_everything()
    w.clock.now += 3600
    with pytest.raises(FailedPrecondition, match="needs re-authorization") as caught:
        await w.broker.resolve("crm")
    assert w.client_secret not in caught.value.message
    meta = await w.broker.get("crm")
    assert meta["status"] == "needs_reauth"
    assert "access_token" not in await stored_secret(w)
    with pytest.raises(FailedPrecondition, match="needs re-authorization"):
        await w.broker.resolve("crm")
    events = await w.audit.query("", 10)
    assert events[-1]["action"] == "oauth2.refresh" and events[-1]["outcome"] == "error"
    # Authorize again: connected, and usable.
    url, state = await w.broker.authorize("crm")
    await w.broker.finish_oauth2(consent(url)["code"], state)
    as_caller(w.tenant)
    assert (await w.broker.get("crm"))["status"] == "connected"
    assert w.provider.live_access_token((await w.broker.resolve("crm")).value)


# --- revocation ---------------------------------------------------------------------------------------------------


async def test_delete_revokes_the_refresh_token(world: World) -> None:
    w = world
    await connect(w)
    secret = await stored_secret(w)
    await w.broker.delete("crm")
    assert (secret["refresh_token"], "refresh_token") in w.provider.revocations
    assert not w.provider.live_access_token(secret["access_token"])  # the provider revoked the family
    event = (await w.audit.query("", 10))[-1]
    assert event["action"] == "oauth2.revoke" and event["outcome"] == "ok"
    assert secret["refresh_token"] not in json.dumps(event)


async def test_delete_happens_when_revocation_fails(world: World) -> None:
    w = world
    await connect(w, revoke_url="http://127.0.0.1:9/revoke")  # nothing listens there, and the guard refuses it
    await w.broker.delete("crm")
    event = (await w.audit.query("", 10))[-1]
    assert event["action"] == "oauth2.revoke" and event["outcome"] == "error" and event["reason"]
    assert await w.broker.all() == []
