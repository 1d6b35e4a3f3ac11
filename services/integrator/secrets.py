"""The local secret backend: secrets encrypted at rest with AES-GCM, one key per tenant.

Each tenant's key is derived from the master key with HKDF, and every ciphertext is bound to its tenant and name
as associated data, so a ciphertext copied to another tenant or name fails to decrypt instead of leaking.
Google Secret Manager (services/integrator/secret_manager.py) implements the same :class:`SecretBackend` interface;
``ALTAN_SECRET_BACKEND`` picks one from :data:`SECRET_BACKENDS`.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from altan import context
from altan.config import Settings
from altan.errors import FailedPrecondition
from altan.store import TenantStore

__all__ = ["SECRET_BACKENDS", "LocalSecretBackend", "SecretBackend", "open_secret_backend"]

_SECRETS = "secrets"


class SecretBackend(Protocol):
    """Where the current tenant's secrets live."""

    async def put(self, name: str, secret: bytes) -> None: ...
    async def get(self, name: str) -> bytes | None: ...
    async def delete(self, name: str) -> None: ...
    async def aclose(self) -> None: ...


class LocalSecretBackend:
    """Secrets as AES-256-GCM ciphertext in the state store (memory or Redis)."""

    def __init__(self, store: TenantStore, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("master key must be 32 bytes")
        self._store = store
        self._tenant_key = lru_cache(maxsize=1024)(lambda tenant: _derive(master_key, tenant))

    def _aead(self) -> tuple[AESGCM, str]:
        tenant = context.current().tenant_id
        return AESGCM(self._tenant_key(tenant)), tenant

    async def put(self, name: str, secret: bytes) -> None:
        aead, tenant = self._aead()
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, secret, _aad(tenant, name))
        await self._store.put(_SECRETS, name, {"v": 1, "blob": base64.b64encode(nonce + sealed).decode()})

    async def get(self, name: str) -> bytes | None:
        doc = await self._store.get(_SECRETS, name)
        if doc is None:
            return None
        aead, tenant = self._aead()
        blob = base64.b64decode(doc["blob"])
        try:
            return aead.decrypt(blob[:12], blob[12:], _aad(tenant, name))
        except InvalidTag:
            raise FailedPrecondition(f"credential '{name}' cannot be decrypted with the current master key") from None

    async def delete(self, name: str) -> None:
        await self._store.delete(_SECRETS, name)

    async def aclose(self) -> None:
        pass  # the state store is closed by its owner


def _local(settings: Settings, store: TenantStore) -> SecretBackend:
    return LocalSecretBackend(store, settings.master_key_bytes())


def _gcp(settings: Settings, store: TenantStore) -> SecretBackend:
    # Imported here: only installs that choose Google pay for loading its client library.
    from services.integrator.secret_manager import SecretManagerBackend

    return SecretManagerBackend.open(settings)


# ALTAN_SECRET_BACKEND -> how to open it (inside the running event loop). Exactly one is used: an unreachable backend
# is an error (503), never a reason to read or write another.
SECRET_BACKENDS: dict[str, Callable[[Settings, TenantStore], SecretBackend]] = {"local": _local, "gcp": _gcp}


def open_secret_backend(settings: Settings, store: TenantStore) -> SecretBackend:
    """The secret backend ``settings`` select."""
    return SECRET_BACKENDS[settings.secret_backend](settings, store)


def _derive(master_key: bytes, tenant: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"altan/tenant/" + tenant.encode()).derive(
        master_key
    )


def _aad(tenant: str, name: str) -> bytes:
    return f"{tenant}\x00{name}".encode()
