"""services.integrator.secret_manager: the ``gcp`` secret backend, through the real google-cloud-secret-manager
asyncio client over a real gRPC channel to an in-process fake of the Secret Manager API (tests/fakes/google_cloud.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from altan.api.credentials import parse_credential_spec
from altan.config import Settings
from altan.errors import FailedPrecondition, Unavailable
from altan.store import MemoryBackend, TenantStore
from services.integrator.credentials import CredentialBroker
from services.integrator.secret_manager import SecretManagerBackend, secret_id
from services.integrator.secrets import open_secret_backend
from tests.fakes.google_cloud import PROJECT_NUMBER, FakeGoogleCloud
from tests.unit.test_server import SECRET as JWT_SECRET
from tests.unit.test_server import as_caller, token

VALUE = b'{"value": "sk-live-the-real-secret-0123"}'


def gcp_settings(address: str, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "jwt_secret": JWT_SECRET,
        "secret_backend": "gcp",
        "gcp_project": "acme-prod",
        "gcp_emulator_host": address,
        "gcp_timeout_seconds": 2.0,
    }
    return Settings(**(fields | overrides))  # type: ignore[arg-type]


@pytest.fixture
def google() -> Iterator[FakeGoogleCloud]:
    with FakeGoogleCloud() as fake:
        yield fake


@pytest.fixture
async def backend(google: FakeGoogleCloud) -> AsyncIterator[SecretManagerBackend]:
    opened = open_secret_backend(gcp_settings(google.address), TenantStore(MemoryBackend(), "integrator"))
    assert isinstance(opened, SecretManagerBackend)
    yield opened
    await opened.aclose()


def caller_as(tenant: str = "acme") -> None:
    as_caller(token(tenant=tenant))


def sid(tenant: str, name: str) -> str:
    return secret_id("altan", tenant, name)


async def test_a_secret_is_stored_read_and_deleted_as_one_labelled_secret(
    backend: SecretManagerBackend, google: FakeGoogleCloud
) -> None:
    caller_as("acme")
    assert await backend.get("crm") is None
    await backend.put("crm", VALUE)
    assert await backend.get("crm") == VALUE
    (stored,) = google.secret_manager.secrets.values()
    assert stored.secret.name == f"projects/{PROJECT_NUMBER}/secrets/{sid('acme', 'crm')}"
    assert dict(stored.secret.labels) == {"managed-by": "altan", "altan-tenant": "acme", "altan-credential": "crm"}
    assert dict(stored.secret.annotations) == {"altan.io/tenant": "acme", "altan.io/credential": "crm"}
    assert "automatic" in stored.secret.replication
    await backend.delete("crm")
    assert google.secret_manager.secrets == {}
    assert await backend.get("crm") is None
    await backend.delete("crm")  # idempotent


async def test_storing_again_adds_a_version_reads_latest_and_destroys_the_older(
    backend: SecretManagerBackend, google: FakeGoogleCloud
) -> None:
    caller_as()
    for value in (b"one", b"two", b"three"):
        await backend.put("crm", value)
    assert await backend.get("crm") == b"three"
    states = google.secret_manager.payloads(sid("acme", "crm"))
    assert states == [("DESTROYED", b""), ("DESTROYED", b""), ("ENABLED", b"three")]


async def test_replicas_storing_at_once_leave_exactly_one_enabled_version(
    backend: SecretManagerBackend, google: FakeGoogleCloud
) -> None:
    caller_as()
    values = [f"v{i}".encode() for i in range(6)]
    await asyncio.gather(*(backend.put("crm", v) for v in values))
    states = google.secret_manager.payloads(sid("acme", "crm"))
    assert [state for state, _ in states].count("ENABLED") == 1
    assert states[-1][0] == "ENABLED" and await backend.get("crm") == states[-1][1]


async def test_tenants_never_share_a_secret(backend: SecretManagerBackend, google: FakeGoogleCloud) -> None:
    caller_as("acme")
    await backend.put("crm", b"acme's")
    caller_as("globex")
    assert await backend.get("crm") is None
    await backend.put("crm", b"globex's")
    assert await backend.get("crm") == b"globex's"
    caller_as("acme")
    assert await backend.get("crm") == b"acme's"
    assert len(google.secret_manager.secrets) == 2


@pytest.mark.parametrize(
    ("tenant", "name"),
    [("acme", "crm"), ("Ünïcødé tenant/with spaces", "crm"), ("t" * 128, "n" * 128), ("a-b", "c"), ("a", "b-c")],
)
def test_secret_ids_are_valid_for_secret_manager_whatever_the_tenant(tenant: str, name: str) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,255}", sid(tenant, name))


def test_secret_ids_do_not_collide_where_a_readable_join_would() -> None:
    pairs = [("a-b", "c"), ("a", "b-c"), ("a", "b\x00c"), ("a\x00b", "c"), ('a"', "b"), ("a", '"b')]
    assert len({sid(t, n) for t, n in pairs}) == len(pairs)
    assert secret_id("altan", "acme", "crm") != secret_id("altan-staging", "acme", "crm")


async def test_labels_are_set_only_where_the_value_is_label_safe(
    backend: SecretManagerBackend, google: FakeGoogleCloud
) -> None:
    caller_as("Acme Corp")
    await backend.put("CRM", VALUE)  # Secret Manager refuses upper case in labels: the annotations keep them
    (stored,) = google.secret_manager.secrets.values()
    assert dict(stored.secret.labels) == {"managed-by": "altan"}
    assert dict(stored.secret.annotations) == {"altan.io/tenant": "Acme Corp", "altan.io/credential": "CRM"}


async def test_a_latest_version_disabled_by_hand_is_a_clear_precondition(
    backend: SecretManagerBackend, google: FakeGoogleCloud
) -> None:
    caller_as()
    await backend.put("crm", VALUE)
    version, _ = google.secret_manager.secrets[sid("acme", "crm")].versions[-1]
    version.state = version.State.DISABLED
    with pytest.raises(FailedPrecondition, match="latest version in Secret Manager is disabled or destroyed"):
        await backend.get("crm")


@pytest.mark.parametrize("rpc", ["AddSecretVersion", "AccessSecretVersion", "DeleteSecret", "CreateSecret"])
@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED])
async def test_a_refused_identity_is_a_503_naming_the_permissions_never_the_secret(
    backend: SecretManagerBackend, google: FakeGoogleCloud, rpc: str, code: grpc.StatusCode
) -> None:
    caller_as()
    if rpc in ("AccessSecretVersion", "DeleteSecret"):
        await backend.put("crm", VALUE)
    google.secret_manager.fail[rpc] = code
    operation = {
        "AddSecretVersion": lambda: backend.put("crm", VALUE),
        "CreateSecret": lambda: backend.put("crm", VALUE),
        "AccessSecretVersion": lambda: backend.get("crm"),
        "DeleteSecret": lambda: backend.delete("crm"),
    }[rpc]
    with pytest.raises(Unavailable) as caught:
        await operation()
    assert "refused the integrator's service account" in caught.value.message
    assert code.name in caught.value.message and "secretmanager." in caught.value.message
    assert "sk-live" not in caught.value.message and caught.value.retry_after == 30


async def test_an_unavailable_api_is_retried_then_a_503_with_retry_after(
    backend: SecretManagerBackend, google: FakeGoogleCloud
) -> None:
    caller_as()
    google.secret_manager.fail["*"] = grpc.StatusCode.UNAVAILABLE
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        await backend.put("crm", VALUE)
    assert caught.value.message.endswith("Google Cloud is unreachable") and caught.value.retry_after == 5
    assert google.secret_manager.calls.count("AddSecretVersion") > 1, "transient failures are retried"
    assert time.monotonic() - started < 4, "retries stay within ALTAN_GCP_TIMEOUT_SECONDS"


async def test_an_unreachable_endpoint_is_a_503_within_the_timeout(
    backend: SecretManagerBackend, google: FakeGoogleCloud
) -> None:
    caller_as()
    await backend.put("crm", VALUE)
    google.stop()
    started = time.monotonic()
    for operation in (lambda: backend.get("crm"), lambda: backend.put("crm", VALUE), lambda: backend.delete("crm")):
        with pytest.raises(Unavailable, match="Google Cloud is unreachable"):
            await operation()
    assert time.monotonic() - started < 10


async def test_the_broker_keeps_metadata_in_the_store_and_the_secret_only_in_secret_manager(
    backend: SecretManagerBackend, google: FakeGoogleCloud
) -> None:
    caller_as()
    state = MemoryBackend()
    broker = CredentialBroker(TenantStore(state, "integrator"), backend)
    spec = {"type": "api_key", "value": "sk-live-only-in-google", "header": "X-Api-Key", "prefix": ""}
    await broker.put("crm", parse_credential_spec(spec))
    assert (await broker.resolve("crm")).value == "sk-live-only-in-google"
    assert "sk-live-only-in-google" not in json.dumps(await state.hgetall("altan:acme:integrator:credentials"))
    assert b"sk-live-only-in-google" in google.secret_manager.payloads(sid("acme", "crm"))[-1][1]


async def test_without_a_project_or_with_a_remote_emulator_the_settings_refuse_to_start() -> None:
    with pytest.raises(ValueError, match="need ALTAN_GCP_PROJECT"):
        Settings(jwt_secret=JWT_SECRET, secret_backend="gcp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gcp_emulator_host"):
        gcp_settings("secretmanager.example.com:443")
