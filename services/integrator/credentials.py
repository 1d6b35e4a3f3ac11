"""The CredentialBroker: validates, stores and resolves the tenant's credentials.

Metadata (type, header, prefix, times) is stored in the clear; every secret part goes to the secret backend and
comes out only to be injected into one outbound call.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from altan.context import require_admin
from altan.errors import FailedPrecondition, InvalidArgument, NotFound
from altan.store import TenantStore
from altan.wire import now_iso, validate_model
from services.integrator.secrets import SecretBackend

__all__ = ["CredentialBroker", "ResolvedCredential"]

_CREDENTIALS = "credentials"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_HEADER = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}$")


class ApiKeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["api_key"]
    value: str = Field(min_length=1, max_length=8192)
    header: str = "Authorization"
    prefix: str = Field(default="Bearer ", max_length=64)

    @field_validator("header")
    @classmethod
    def _header_token(cls, value: str) -> str:
        if not _HEADER.match(value):
            raise ValueError("must be an HTTP header name")
        return value

    @field_validator("value", "prefix")
    @classmethod
    def _no_line_breaks(cls, value: str) -> str:
        # Only what an HTTP header value may hold (RFC 9110 field-vchar, space, tab): anything else would fail at
        # send time, and the HTTP library's error would quote the value.
        if "\r" in value or "\n" in value:
            raise ValueError("must not contain line breaks")
        if any(not (ch == "\t" or " " <= ch <= "~") for ch in value):
            raise ValueError("must hold only printable ASCII characters")
        return value


class OAuth2Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["oauth2"]
    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    authorize_url: str = Field(pattern=r"^https?://")
    token_url: str = Field(pattern=r"^https?://")
    revoke_url: str | None = Field(default=None, pattern=r"^https?://")
    scopes: list[str] = Field(default_factory=list)
    redirect_uri: str = Field(pattern=r"^https?://")


class ResolvedCredential(BaseModel):
    """A credential ready to inject: ``header: prefix + value``."""

    name: str
    header: str
    prefix: str
    value: str


def _parse(spec: Any) -> ApiKeySpec | OAuth2Spec:
    if not isinstance(spec, dict):
        raise InvalidArgument("credential: must be a JSON object")
    kind = spec.get("type")
    model: type[ApiKeySpec] | type[OAuth2Spec]
    if kind == "api_key":
        model = ApiKeySpec
    elif kind == "oauth2":
        model = OAuth2Spec
    else:
        raise InvalidArgument("type: must be 'api_key' or 'oauth2'")
    return validate_model(model, spec, "credential")


class CredentialBroker:
    """Credentials of the current tenant."""

    def __init__(self, store: TenantStore, secrets: SecretBackend) -> None:
        self._store = store
        self._secrets = secrets

    async def put(self, name: str, spec: Any) -> tuple[dict[str, Any], bool]:
        require_admin("storing a credential")
        if not _NAME.match(name):
            raise InvalidArgument("name: 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit")
        parsed = _parse(spec)
        now = now_iso()
        previous = await self._store.get(_CREDENTIALS, name)
        meta: dict[str, Any] = {"name": name, "type": parsed.type, "created_at": now, "updated_at": now}
        if previous is not None:
            meta["created_at"] = previous["created_at"]
        if isinstance(parsed, ApiKeySpec):
            meta.update(header=parsed.header, prefix=parsed.prefix)
            secret = {"value": parsed.value}
        else:
            public = parsed.model_dump(exclude={"client_secret"})
            meta.update(public)
            secret = {"client_secret": parsed.client_secret}
        await self._secrets.put(name, json.dumps(secret).encode())
        await self._store.put(_CREDENTIALS, name, meta)
        return meta, previous is None

    async def all(self) -> list[dict[str, Any]]:
        return sorted((await self._store.all(_CREDENTIALS)).values(), key=lambda m: m["name"])

    async def delete(self, name: str) -> None:
        require_admin("deleting a credential")
        if not await self._store.delete(_CREDENTIALS, name):
            raise NotFound(f"credential '{name}' not found")
        await self._secrets.delete(name)

    async def resolve(self, name: str) -> ResolvedCredential:
        """The secret for one outbound call."""
        meta = await self._store.get(_CREDENTIALS, name)
        if meta is None:
            raise FailedPrecondition(f"credential '{name}' not found")
        raw = await self._secrets.get(name)
        if raw is None:
            raise FailedPrecondition(f"credential '{name}' has no stored secret")
        secret = json.loads(raw)
        if meta["type"] == "api_key":
            return ResolvedCredential(name=name, header=meta["header"], prefix=meta["prefix"], value=secret["value"])
        token = secret.get("access_token")
        if not token:
            raise FailedPrecondition(f"credential '{name}' is not authorized yet (run the OAuth2 flow)")
        return ResolvedCredential(name=name, header="Authorization", prefix="Bearer ", value=token)
