"""The CredentialBroker: stores and resolves the tenant's credentials.

Metadata (type, header, prefix, hosts, status, times, the OAuth2 client without its secret) is stored in the clear;
every secret part goes to the secret backend and comes out only to be injected into one outbound call.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from altan.api.convert import now_ms
from altan.api.credentials import ApiKeySpec, OAuth2Spec, check_name
from altan.context import require_admin
from altan.egress import HostBinding
from altan.errors import AltanError, FailedPrecondition, NotFound, PermissionDenied
from altan.store import TenantStore
from services.integrator.oauth2 import CREDENTIALS as _CREDENTIALS
from services.integrator.oauth2 import OAuth2Flows
from services.integrator.secrets import SecretBackend

__all__ = ["CredentialBroker", "ResolvedCredential"]


class ResolvedCredential(BaseModel):
    """A credential ready to inject: ``header: prefix + value``, and the hosts ``http_request`` may send it to."""

    name: str
    header: str
    prefix: str
    value: str
    hosts: list[str]
    # An OAuth2 access token, which the broker can refresh when the third party refuses it (not sent anywhere).
    refreshable: bool = False

    def injected(self) -> dict[str, Any]:
        """The fields of the InjectedCredential proto."""
        return self.model_dump(exclude={"refreshable"})


class CredentialBroker:
    """Credentials of the current tenant. Without ``oauth2`` (unit tests), OAuth2 access tokens are used as stored."""

    def __init__(self, store: TenantStore, secrets: SecretBackend, oauth2: OAuth2Flows | None = None) -> None:
        self._store = store
        self._secrets = secrets
        self._oauth2 = oauth2

    async def put(self, name: str, spec: ApiKeySpec | OAuth2Spec) -> tuple[dict[str, Any], bool]:
        """Store or replace a credential; ``(metadata, created)``."""
        require_admin("storing a credential")
        check_name(name)
        now = now_ms()
        previous = await self._store.get(_CREDENTIALS, name)
        meta: dict[str, Any] = {
            "name": name,
            "type": spec.type,
            "hosts": list(spec.hosts),
            "tools": list(spec.tools),
            "created_at": now if previous is None else previous["created_at"],
            "updated_at": now,
        }
        if isinstance(spec, ApiKeySpec):
            meta.update(header=spec.header, prefix=spec.prefix, status="connected")
            secret = {"value": spec.value}
        else:
            meta.update(spec.model_dump(exclude={"type", "hosts", "tools", "client_secret"}), status="pending")
            secret = {"client_secret": spec.client_secret}
        await self._secrets.put(name, json.dumps(secret).encode())
        await self._store.put(_CREDENTIALS, name, meta)
        return meta, previous is None

    async def get(self, name: str) -> dict[str, Any]:
        meta = await self._store.get(_CREDENTIALS, name)
        if meta is None:
            raise NotFound(f"credential '{name}' not found")
        return meta

    async def all(self) -> list[dict[str, Any]]:
        return sorted((await self._store.all(_CREDENTIALS)).values(), key=lambda m: m["name"])

    async def delete(self, name: str) -> None:
        """Delete a credential; an OAuth2 one's tokens are revoked too where the provider can (best effort, audited:
        the deletion happens whatever the provider answers)."""
        require_admin("deleting a credential")
        meta = await self._store.get(_CREDENTIALS, name)
        secret: dict[str, Any] = {}
        if meta is not None and meta["type"] == "oauth2" and meta.get("revoke_url") and self._oauth2 is not None:
            try:
                secret = json.loads(await self._secrets.get(name) or b"{}")
            except AltanError:
                secret = {}  # undecryptable: nothing to revoke with, and the deletion goes on
        if not await self._store.delete(_CREDENTIALS, name):
            raise NotFound(f"credential '{name}' not found")
        await self._secrets.delete(name)
        if secret and meta is not None and self._oauth2 is not None:
            await self._oauth2.revoke(name, meta, secret)

    async def authorize(self, name: str) -> tuple[str, str]:
        """Start the OAuth2 flow of an oauth2 credential: ``(authorization_url, state)``."""
        require_admin("authorizing a credential")
        meta = await self.get(name)
        if meta["type"] != "oauth2":
            raise FailedPrecondition(f"credential '{name}' is not an oauth2 credential")
        if self._oauth2 is None:
            raise FailedPrecondition("OAuth2 is not configured in this integrator")
        return await self._oauth2.authorize(name, meta)

    async def finish_oauth2(self, code: str, state: str, error: str = "") -> str:
        """Finish the flow ``state`` names (binding its tenant); answers the credential's name."""
        if self._oauth2 is None:
            raise FailedPrecondition("OAuth2 is not configured in this integrator")
        return await self._oauth2.finish(code, state, error)

    async def refresh(self, name: str, *, stale: str) -> ResolvedCredential:
        """The credential again after the third party refused ``stale``, its access token: refreshed once."""
        if self._oauth2 is None:
            raise FailedPrecondition(f"credential '{name}' was refused and cannot be refreshed here")
        meta = await self._store.get(_CREDENTIALS, name)
        if meta is None:
            raise FailedPrecondition(f"credential '{name}' not found")
        token = await self._oauth2.refresh(name, stale=stale)
        return ResolvedCredential(
            name=name, header="Authorization", prefix="Bearer ", value=token, hosts=meta["hosts"], refreshable=True
        )

    async def resolve(
        self, name: str, *, destination: str | None = None, container_tool: str | None = None
    ) -> ResolvedCredential:
        """The secret for one outbound call; for ``destination`` (an ``http_request`` URL), only if the credential's
        ``hosts`` name it; for ``container_tool``, only if its ``tools`` name that tool: the secret is not even read
        otherwise."""
        meta = await self._store.get(_CREDENTIALS, name)
        if meta is None:
            raise FailedPrecondition(f"credential '{name}' not found")
        if destination is not None:
            _check_destination(name, meta["hosts"], destination)
        if container_tool is not None and container_tool not in meta.get("tools", []):
            raise PermissionDenied(
                f"credential '{name}' is not granted to tool '{container_tool}': its admin lists the container "
                f'tools that may receive it in "tools"'
            )
        raw = await self._secrets.get(name)
        if raw is None:
            raise FailedPrecondition(f"credential '{name}' has no stored secret")
        secret = json.loads(raw)
        if meta["type"] == "api_key":
            return ResolvedCredential(
                name=name, header=meta["header"], prefix=meta["prefix"], value=secret["value"], hosts=meta["hosts"]
            )
        if self._oauth2 is not None:
            token = await self._oauth2.access_token(name, meta, secret)
        else:
            token = secret.get("access_token")
            if not token:
                raise FailedPrecondition(f"credential '{name}' is not authorized yet (run the OAuth2 flow)")
        return ResolvedCredential(
            name=name, header="Authorization", prefix="Bearer ", value=token, hosts=meta["hosts"], refreshable=True
        )


def _check_destination(name: str, hosts: list[str], url: str) -> None:
    if not hosts:
        raise PermissionDenied(f"credential '{name}' lists no hosts, so http_request may not send it anywhere")
    if not HostBinding.parse(hosts).allows_url(url):
        shown = ", ".join(hosts[:5]) + (", ..." if len(hosts) > 5 else "")
        raise PermissionDenied(
            f"credential '{name}' may not be sent to that URL: its hosts are {shown} (a host without a port means "
            "https on 443)"
        )
