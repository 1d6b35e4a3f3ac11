"""The ``gcp`` secret backend: one Google Secret Manager secret per tenant credential.

- **Ids**: ``<prefix>-<sha256 hex of [tenant, name]>``. Tenants and credential names may hold characters a secret id
  may not, and any readable shortening could make two of them meet; the hash of the pair (JSON-encoded, so no
  separator is ambiguous) cannot, and the prefix (``ALTAN_GCP_SECRET_PREFIX``) keeps installs sharing a project apart
  and lets an IAM condition give an install exactly its own secrets. The tenant and name are kept readable in the
  secret's annotations (exact) and labels (where label-safe), with ``managed-by: altan``.
- **Versions**: storing adds a version; reading takes ``latest``; after a new version is added, the older enabled
  ones are destroyed. A replaced API key must stop being readable (rotation is usually why it is replaced), and
  nothing reads an old version. Only versions older than the one just added are destroyed, so two replicas storing at
  once never destroy each other's newer version. Deleting the credential deletes the secret, every version with it.
- Payloads carry CRC32C checksums both ways (``data_crc32c``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

import google_crc32c
from google.api_core import exceptions as google_errors
from google.cloud.secretmanager_v1 import (
    AccessSecretVersionRequest,
    ListSecretVersionsRequest,
    Replication,
    Secret,
    SecretPayload,
    SecretVersion,
)
from google.cloud.secretmanager_v1.services.secret_manager_service import SecretManagerServiceAsyncClient
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcAsyncIOTransport,
)

from altan import context
from altan.config import Settings
from altan.errors import FailedPrecondition, Unavailable
from services.integrator.google_cloud import GOOGLE_ERRORS, call_options, google_error, open_client

__all__ = ["SecretManagerBackend", "secret_id"]

log = logging.getLogger(__name__)

_LABEL_SAFE = re.compile(r"^[a-z0-9_-]{1,63}$")
_NEEDS = (
    "secretmanager.secrets.create/delete and secretmanager.versions.add/access/list/destroy on the install's secrets "
    "(docs/operations.md, Google Cloud)"
)


def secret_id(prefix: str, tenant: str, name: str) -> str:
    """The Secret Manager id of one tenant's credential: valid (``[A-Za-z0-9_-]``, at most 255) and unique per pair."""
    digest = hashlib.sha256(json.dumps([tenant, name]).encode()).hexdigest()
    return f"{prefix}-{digest}"


class SecretManagerBackend:
    """Secrets of the current tenant in Google Secret Manager (project ``project``)."""

    def __init__(self, client: SecretManagerServiceAsyncClient, project: str, prefix: str, timeout: float) -> None:
        self._client = client
        self._project = project
        self._prefix = prefix
        self._options = call_options(timeout)

    @classmethod
    def open(cls, settings: Settings) -> SecretManagerBackend:
        client = open_client(
            settings, SecretManagerServiceAsyncClient, SecretManagerServiceGrpcAsyncIOTransport, "ALTAN_SECRET_BACKEND"
        )
        assert settings.gcp_project is not None  # Settings requires it with this backend
        return cls(client, settings.gcp_project, settings.gcp_secret_prefix, settings.gcp_timeout_seconds)

    async def aclose(self) -> None:
        await self._client.transport.close()

    def _path(self, name: str) -> tuple[str, str]:
        tenant = context.current().tenant_id
        return f"projects/{self._project}/secrets/{secret_id(self._prefix, tenant, name)}", tenant

    async def put(self, name: str, secret: bytes) -> None:
        path, tenant = self._path(name)
        payload = SecretPayload(data=secret, data_crc32c=google_crc32c.value(secret))
        try:
            try:
                version = await self._client.add_secret_version(parent=path, payload=payload, **self._options)
            except google_errors.NotFound:
                await self._create(path, tenant, name)
                version = await self._client.add_secret_version(parent=path, payload=payload, **self._options)
        except GOOGLE_ERRORS as exc:
            raise google_error(exc, f"storing credential '{name}' in Secret Manager", needs=_NEEDS) from None
        await self._destroy_older(path, version)

    async def get(self, name: str) -> bytes | None:
        path, _ = self._path(name)
        request = AccessSecretVersionRequest(name=f"{path}/versions/latest")
        try:
            answer = await self._client.access_secret_version(request=request, **self._options)
        except google_errors.NotFound:
            return None
        except google_errors.FailedPrecondition:
            raise FailedPrecondition(
                f"credential '{name}': its latest version in Secret Manager is disabled or destroyed; store it again"
            ) from None
        except GOOGLE_ERRORS as exc:
            raise google_error(exc, f"reading credential '{name}' from Secret Manager", needs=_NEEDS) from None
        data = bytes(answer.payload.data)
        if "data_crc32c" in answer.payload and answer.payload.data_crc32c != google_crc32c.value(data):
            raise Unavailable(f"reading credential '{name}' from Secret Manager: the payload's checksum does not match")
        return data

    async def delete(self, name: str) -> None:
        path, _ = self._path(name)
        try:
            await self._client.delete_secret(name=path, **self._options)
        except google_errors.NotFound:
            return  # already gone: deleting is idempotent
        except GOOGLE_ERRORS as exc:
            raise google_error(exc, f"deleting credential '{name}' from Secret Manager", needs=_NEEDS) from None

    async def _create(self, path: str, tenant: str, name: str) -> None:
        labels = {"managed-by": "altan"}
        for key, value in (("altan-tenant", tenant), ("altan-credential", name)):
            if _LABEL_SAFE.match(value):
                labels[key] = value
        secret = Secret(
            replication=Replication(automatic=Replication.Automatic()),
            labels=labels,
            annotations={"altan.io/tenant": tenant, "altan.io/credential": name},
        )
        parent, _, sid = path.rpartition("/secrets/")
        try:
            await self._client.create_secret(parent=parent, secret_id=sid, secret=secret, **self._options)
        except google_errors.AlreadyExists:
            pass  # another replica created it first: both add their versions to it

    async def _destroy_older(self, path: str, added: SecretVersion) -> None:
        """Destroy the enabled versions older than ``added``. The new secret is stored already: a failure here is
        logged, and the next store destroys what this one left."""
        newest = _number(added.name)
        try:
            request = ListSecretVersionsRequest(parent=path, filter="state:ENABLED")
            pager = await self._client.list_secret_versions(request=request, **self._options)
            older = [v.name async for v in pager if _number(v.name) < newest]
            for version_name in older:
                try:
                    await self._client.destroy_secret_version(name=version_name, **self._options)
                except (google_errors.NotFound, google_errors.FailedPrecondition):
                    pass  # destroyed meanwhile (another replica storing at the same time)
        except GOOGLE_ERRORS as exc:
            error: Any = google_error(exc, "destroying replaced secret versions", needs=_NEEDS)
            log.warning("older versions of a secret were left enabled: %s", error.message)


def _number(version_name: str) -> int:
    last = version_name.rsplit("/", 1)[-1]
    return int(last) if last.isdigit() else 0
