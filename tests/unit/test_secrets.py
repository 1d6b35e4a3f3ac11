"""services.integrator.secrets and .credentials: secrets encrypted per tenant and bound to their name, and the
CredentialBroker that validates, stores and resolves them without ever echoing a secret.
"""

from __future__ import annotations

import base64
import json
import os
import traceback
import uuid
from typing import Any

import pytest

from altan import context
from altan.api.credentials import parse_credential_spec
from altan.context import RequestContext
from altan.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from altan.store import MemoryBackend, TenantStore
from services.integrator import secrets as secrets_module
from services.integrator.credentials import CredentialBroker, ResolvedCredential
from services.integrator.secrets import LocalSecretBackend

MASTER = os.urandom(32)
PLAINTEXT = b"sk-live-0123456789abcdef-the-real-secret"
NAMESPACE = "integrator"


async def put(broker: CredentialBroker, name: str, spec: Any) -> tuple[dict[str, Any], bool]:
    """What the Integrator's PutCredential does: the shared model checks the spec, then the broker stores it."""
    return await broker.put(name, parse_credential_spec(spec))


def as_caller(tenant: str, role: str = "admin") -> None:
    context.bind(RequestContext(tenant_id=tenant, user="u", role=role, token="t"))  # type: ignore[arg-type]


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def store(backend: MemoryBackend) -> TenantStore:
    return TenantStore(backend, NAMESPACE)


@pytest.fixture
def vault(store: TenantStore) -> LocalSecretBackend:
    return LocalSecretBackend(store, MASTER)


def secrets_key(tenant: str) -> str:
    return f"altan:{tenant}:{NAMESPACE}:secrets"


# --- LocalSecretBackend ---------------------------------------------------------------------------------------


async def test_round_trip_and_delete(vault: LocalSecretBackend) -> None:
    as_caller("acme")
    assert await vault.get("stripe") is None
    await vault.put("stripe", PLAINTEXT)
    assert await vault.get("stripe") == PLAINTEXT
    await vault.put("stripe", b"rotated")
    assert await vault.get("stripe") == b"rotated"
    await vault.delete("stripe")
    assert await vault.get("stripe") is None


async def test_empty_and_binary_secrets_round_trip(vault: LocalSecretBackend) -> None:
    as_caller("acme")
    for value in (b"", bytes(range(256)), "ünïcødé".encode()):
        await vault.put("x", value)
        assert await vault.get("x") == value


async def test_stored_ciphertext_does_not_contain_the_plaintext(
    vault: LocalSecretBackend, backend: MemoryBackend
) -> None:
    as_caller("acme")
    await vault.put("stripe", PLAINTEXT)
    raw = await backend.hget(secrets_key("acme"), "stripe")
    assert raw is not None
    assert PLAINTEXT.decode() not in raw
    assert base64.b64encode(PLAINTEXT).decode() not in raw
    blob = base64.b64decode(json.loads(raw)["blob"])
    assert PLAINTEXT not in blob
    # nonce (12) + ciphertext + tag (16)
    assert len(blob) == 12 + len(PLAINTEXT) + 16


async def test_same_secret_encrypts_differently_each_time(vault: LocalSecretBackend, backend: MemoryBackend) -> None:
    as_caller("acme")
    await vault.put("a", PLAINTEXT)
    first = await backend.hget(secrets_key("acme"), "a")
    await vault.put("a", PLAINTEXT)
    assert await backend.hget(secrets_key("acme"), "a") != first


async def test_ciphertext_copied_to_another_tenant_fails_to_decrypt(
    vault: LocalSecretBackend, backend: MemoryBackend
) -> None:
    as_caller("victim")
    await vault.put("stripe", PLAINTEXT)
    stolen = await backend.hget(secrets_key("victim"), "stripe")
    assert stolen is not None
    await backend.hset(secrets_key("attacker"), "stripe", stolen)
    as_caller("attacker")
    with pytest.raises(FailedPrecondition) as caught:
        await vault.get("stripe")
    assert PLAINTEXT.decode() not in caught.value.message


async def test_ciphertext_copied_to_another_name_fails_to_decrypt(
    vault: LocalSecretBackend, backend: MemoryBackend
) -> None:
    as_caller("acme")
    await vault.put("stripe", PLAINTEXT)
    blob = await backend.hget(secrets_key("acme"), "stripe")
    assert blob is not None
    await backend.hset(secrets_key("acme"), "github", blob)
    with pytest.raises(FailedPrecondition):
        await vault.get("github")
    assert await vault.get("stripe") == PLAINTEXT


async def test_a_different_master_key_fails_to_decrypt(store: TenantStore) -> None:
    as_caller("acme")
    await LocalSecretBackend(store, MASTER).put("stripe", PLAINTEXT)
    with pytest.raises(FailedPrecondition, match="master key"):
        await LocalSecretBackend(store, os.urandom(32)).get("stripe")


async def test_tampered_ciphertext_fails_to_decrypt(vault: LocalSecretBackend, backend: MemoryBackend) -> None:
    as_caller("acme")
    await vault.put("stripe", PLAINTEXT)
    raw = await backend.hget(secrets_key("acme"), "stripe")
    assert raw is not None
    blob = bytearray(base64.b64decode(json.loads(raw)["blob"]))
    blob[20] ^= 1
    await backend.hset(secrets_key("acme"), "stripe", json.dumps({"v": 1, "blob": base64.b64encode(blob).decode()}))
    with pytest.raises(FailedPrecondition):
        await vault.get("stripe")


def test_per_tenant_keys_differ_and_are_stable() -> None:
    derive = secrets_module._derive
    assert derive(MASTER, "acme") == derive(MASTER, "acme")
    assert len(derive(MASTER, "acme")) == 32
    keys = {derive(MASTER, t) for t in ("acme", "globex", "acme ", "ACME")}
    assert len(keys) == 4
    assert derive(os.urandom(32), "acme") != derive(MASTER, "acme")
    assert MASTER not in keys


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_master_key_must_be_32_bytes(store: TenantStore, size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        LocalSecretBackend(store, os.urandom(size))


# --- CredentialBroker ---------------------------------------------------------------------------------------------


@pytest.fixture
def broker(store: TenantStore, vault: LocalSecretBackend) -> CredentialBroker:
    return CredentialBroker(store, vault)


API_KEY = "sk-test-ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789"


async def test_api_key_put_list_resolve_delete(broker: CredentialBroker, backend: MemoryBackend) -> None:
    as_caller("acme")
    meta, created = await put(broker, "openai", {"type": "api_key", "value": API_KEY})
    assert created is True
    assert meta["name"] == "openai" and meta["type"] == "api_key"
    assert (meta["header"], meta["prefix"]) == ("Authorization", "Bearer ")
    assert API_KEY not in json.dumps(meta)

    meta2, created2 = await put(
        broker, "weather", {"type": "api_key", "value": "w-123", "header": "X-Api-Key", "prefix": ""}
    )
    assert created2 is True and (meta2["header"], meta2["prefix"]) == ("X-Api-Key", "")

    listed = await broker.all()
    assert [m["name"] for m in listed] == ["openai", "weather"]
    assert API_KEY not in json.dumps(listed)

    assert await broker.resolve("openai") == ResolvedCredential(
        name="openai", header="Authorization", prefix="Bearer ", value=API_KEY, hosts=[]
    )
    assert (await broker.resolve("weather")).value == "w-123"

    # Nothing in the state store holds the secret in the clear.
    for table in backend._hashes.values():
        assert API_KEY not in json.dumps(table)

    await broker.delete("openai")
    assert [m["name"] for m in await broker.all()] == ["weather"]
    with pytest.raises(FailedPrecondition):
        await broker.resolve("openai")
    with pytest.raises(NotFound):
        await broker.delete("openai")


async def test_an_http_request_destination_must_be_one_of_the_credential_hosts(
    broker: CredentialBroker, backend: MemoryBackend
) -> None:
    as_caller("acme")
    await put(broker, "gh", {"type": "api_key", "value": API_KEY, "hosts": ["api.github.com", "10.0.0.5:8443"]})
    await put(broker, "nowhere", {"type": "api_key", "value": API_KEY})
    resolved = await broker.resolve("gh", destination="https://API.GITHUB.com/user")
    assert (resolved.value, resolved.hosts) == (API_KEY, ["api.github.com", "10.0.0.5:8443"])
    assert (await broker.resolve("gh", destination="http://10.0.0.5:8443/")).value == API_KEY
    for url in ("https://evil.example/", "http://api.github.com/", "https://10.0.0.5/", "nonsense"):
        with pytest.raises(PermissionDenied, match="credential 'gh' may not be sent to that URL: its hosts are api"):
            await broker.resolve("gh", destination=url)
    with pytest.raises(PermissionDenied, match="credential 'nowhere' lists no hosts"):
        await broker.resolve("nowhere", destination="https://api.github.com/")
    # A custom tool's own credential has no destination to check: it goes to the endpoint its admin wrote.
    assert (await broker.resolve("nowhere")).value == API_KEY


async def test_replacing_keeps_created_at(broker: CredentialBroker) -> None:
    as_caller("acme")
    first, created = await put(broker, "k", {"type": "api_key", "value": "v1"})
    second, created_again = await put(broker, "k", {"type": "api_key", "value": "v2"})
    assert (created, created_again) == (True, False)
    assert second["created_at"] == first["created_at"]
    assert (await broker.resolve("k")).value == "v2"


async def test_members_may_resolve_and_list_but_not_change(broker: CredentialBroker) -> None:
    as_caller("acme", "admin")
    await put(broker, "k", {"type": "api_key", "value": API_KEY})
    as_caller("acme", "member")
    with pytest.raises(PermissionDenied):
        await put(broker, "k2", {"type": "api_key", "value": "x"})
    with pytest.raises(PermissionDenied):
        await broker.delete("k")
    assert [m["name"] for m in await broker.all()] == ["k"]
    assert (await broker.resolve("k")).value == API_KEY


async def test_credentials_are_per_tenant(broker: CredentialBroker) -> None:
    as_caller("acme")
    await put(broker, "shared-name", {"type": "api_key", "value": "acme-secret"})
    as_caller("globex")
    assert await broker.all() == []
    with pytest.raises(FailedPrecondition):
        await broker.resolve("shared-name")
    with pytest.raises(NotFound):
        await broker.delete("shared-name")
    await put(broker, "shared-name", {"type": "api_key", "value": "globex-secret"})
    assert (await broker.resolve("shared-name")).value == "globex-secret"
    as_caller("acme")
    assert (await broker.resolve("shared-name")).value == "acme-secret"


async def test_oauth2_metadata_is_public_and_secret_is_not(broker: CredentialBroker) -> None:
    as_caller("acme")
    client_secret = f"cs-{uuid.uuid4().hex}"
    meta, _ = await put(
        broker,
        "slack",
        {
            "type": "oauth2",
            "client_id": "cid",
            "client_secret": client_secret,
            "authorize_url": "https://slack.example/oauth/authorize",
            "token_url": "https://slack.example/api/oauth.access",
            "scopes": ["chat:write"],
            "redirect_uri": "http://127.0.0.1:8080/v1/oauth2/callback",
        },
    )
    assert meta["client_id"] == "cid" and meta["scopes"] == ["chat:write"]
    assert client_secret not in json.dumps(meta) and client_secret not in json.dumps(await broker.all())
    with pytest.raises(FailedPrecondition, match="not authorized"):
        await broker.resolve("slack")


SECRET_VALUE = "sk-SUPER-SECRET-VALUE-1234567890"


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "api_key", "value": SECRET_VALUE + "\r\nX-Injected: 1"},
        {"type": "api_key", "value": SECRET_VALUE, "header": "Bad Header: " + SECRET_VALUE},
        {"type": "api_key", "value": SECRET_VALUE, "prefix": SECRET_VALUE + "\n"},
        {"type": "api_key", "value": SECRET_VALUE, "unexpected": SECRET_VALUE},
        {"type": "api_key", "value": SECRET_VALUE * 300},
        {"type": "api_key", "value": [SECRET_VALUE]},
        {"type": "api_key", "value": {"nested": SECRET_VALUE}},
        {"type": "api_key", "value": ""},
        {"type": "api_key"},
        {"type": SECRET_VALUE, "value": SECRET_VALUE},
        {"value": SECRET_VALUE},
        {
            "type": "oauth2",
            "client_id": "c",
            "client_secret": SECRET_VALUE,
            "authorize_url": SECRET_VALUE,
            "token_url": "https://x.example/token",
            "redirect_uri": "https://x.example/cb",
        },
        {"type": "oauth2", "client_id": "c", "client_secret": [SECRET_VALUE]},
        [SECRET_VALUE],
        SECRET_VALUE,
    ],
)
async def test_invalid_specs_never_echo_the_secret(broker: CredentialBroker, spec: Any) -> None:
    as_caller("acme")
    with pytest.raises(InvalidArgument) as caught:
        await put(broker, "cred", spec)
    assert SECRET_VALUE not in caught.value.message
    assert SECRET_VALUE not in str(caught.value)
    assert SECRET_VALUE not in json.dumps(caught.value.to_body())
    # Nor does a logged traceback: pydantic's own error (which echoes the input) is not chained.
    assert SECRET_VALUE not in "".join(traceback.format_exception(caught.value))
    assert await broker.all() == []


@pytest.mark.parametrize("name", ["", "-leading", "has space", "a/b", "x" * 129, "ü"])
async def test_invalid_names_are_refused(broker: CredentialBroker, name: str) -> None:
    as_caller("acme")
    with pytest.raises(InvalidArgument, match="name"):
        await put(broker, name, {"type": "api_key", "value": "v"})
