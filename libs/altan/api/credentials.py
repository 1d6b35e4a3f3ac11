"""Credentials: API keys and OAuth2 clients; the API answers metadata only (API.md "Credentials")."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, RootModel, field_validator

from altan.api.common import ABSENT, ApiModel, HttpUrl, Name, Timestamp, validate
from altan.api.convert import enum_name, enum_value, rfc3339, timestamp
from altan.egress import HostBinding
from altan.errors import InvalidArgument
from altan.v1 import common_pb2, integrator_pb2

__all__ = [
    "ApiKeySpec",
    "Authorization",
    "Credential",
    "CredentialList",
    "CredentialName",
    "CredentialSpec",
    "OAuth2Connected",
    "OAuth2Spec",
    "check_name",
    "credential_json",
    "credential_spec_from_proto",
    "credential_spec_to_proto",
    "credential_status_name",
    "credential_to_proto",
    "parse_credential_spec",
]

_AUTH = common_pb2.AuthType.DESCRIPTOR
_STATUS = integrator_pb2.CredentialStatus.DESCRIPTOR

CredentialName = Name


def _one_host(value: str) -> str:
    HostBinding.parse([value])  # ValueError, with the reason, for anything the egress guard could not read as a host
    return value


# `host` or `host:port`; IPv6 in brackets. The pattern is for the OpenAPI document; _one_host decides.
Host = Annotated[
    str,
    Field(pattern=r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$"),
    AfterValidator(_one_host),
]
Hosts = Annotated[list[Host], Field(max_length=50, description="Where http_request may send the credential.")]
HeaderName = Annotated[str, Field(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}$")]
# Container tools a credential is granted to (their ids): nothing reaches a tool container unless its admin lists it.
GrantedTools = Annotated[
    list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_\-]{0,63}$")]],
    Field(max_length=100, description="The container tools that may receive the credential (tool ids)."),
]


# What _header_safe checks, for the OpenAPI document (the check itself gives the plainer message).
_PRINTABLE: dict[str, Any] = {"pattern": r"^[\t\x20-\x7e]*$"}


def _header_safe(value: str) -> str:
    # Only what an HTTP header value may hold (RFC 9110 field-vchar, space, tab): anything else would fail at send
    # time, and the HTTP library's error would quote the value.
    if any(not (ch == "\t" or " " <= ch <= "~") for ch in value):
        raise ValueError("must hold only printable ASCII characters (no line breaks)")
    return value


class ApiKeySpec(ApiModel):
    """An API key, sent as `header: prefix + value`."""

    type: Literal["api_key"]
    value: str = Field(
        min_length=1, max_length=8192, description="The key. Never returned.", json_schema_extra=_PRINTABLE
    )
    header: HeaderName = "Authorization"
    prefix: str = Field(default="Bearer ", max_length=64, json_schema_extra=_PRINTABLE)
    hosts: Hosts = Field(default_factory=list)
    tools: GrantedTools = Field(default_factory=list)

    _printable = field_validator("value", "prefix")(_header_safe)


class OAuth2Spec(ApiModel):
    """An OAuth2 client for the authorization-code flow with PKCE."""

    type: Literal["oauth2"]
    client_id: str = Field(min_length=1, max_length=1024)
    client_secret: str = Field(min_length=1, max_length=8192, description="Never returned.")
    authorize_url: HttpUrl
    token_url: HttpUrl
    revoke_url: HttpUrl = Field(default=ABSENT)
    scopes: list[Annotated[str, Field(min_length=1, max_length=512)]] = Field(default_factory=list, max_length=100)
    redirect_uri: HttpUrl
    hosts: Hosts = Field(default_factory=list)
    tools: GrantedTools = Field(default_factory=list)


class Credential(BaseModel):
    """Credential metadata, as the API answers it; never a secret."""

    name: str
    type: Literal["api_key", "oauth2"]
    status: Literal["connected", "pending", "needs_reauth", "error"]
    hosts: list[str]
    tools: list[str] | None = Field(default=ABSENT, description="Present when container tools are granted it.")
    header: str | None = Field(default=ABSENT, description="API keys: the header that carries the key.")
    prefix: str | None = Field(default=ABSENT, description="API keys: the key's prefix in that header.")
    client_id: str | None = None
    authorize_url: str | None = None
    token_url: str | None = None
    revoke_url: str | None = None
    scopes: list[str] | None = None
    redirect_uri: str | None = None
    created_at: Timestamp
    updated_at: Timestamp


class CredentialList(BaseModel):
    """One page of credential metadata, by name."""

    credentials: list[Credential]
    next_page_token: str | None = Field(default=ABSENT, description="Present when there is another page.")


class Authorization(BaseModel):
    """Where to send the user's browser to authorize an oauth2 credential."""

    authorization_url: str = Field(
        description="The provider's authorization URL, with the S256 code challenge and the state."
    )
    state: str = Field(description="One-time, valid for a few minutes; it comes back to the callback with the code.")


class OAuth2Connected(BaseModel):
    """The answer of the OAuth2 callback: the credential now holds its tokens."""

    credential: str
    status: Literal["connected"]


class CredentialSpec(RootModel[Annotated[ApiKeySpec | OAuth2Spec, Field(discriminator="type")]]):
    """A credential as the tenant writes it: an API key or an OAuth2 client (documentation of the body)."""


def parse_credential_spec(body: Any) -> ApiKeySpec | OAuth2Spec:
    """A credential to store, from a REST body or a proto (via :func:`credential_spec_from_proto`)."""
    if not isinstance(body, dict):
        raise InvalidArgument("credential: must be a JSON object")
    kind = body.get("type")
    if kind == "api_key":
        return validate(ApiKeySpec, body, "credential")
    if kind == "oauth2":
        return validate(OAuth2Spec, body, "credential")
    raise InvalidArgument("type: must be 'api_key' or 'oauth2'")


def check_name(name: str) -> str:
    """A credential's name as the path or the request gives it."""
    validate(_NameOnly, {"name": name}, "name")  # the same words as the REST path's own check
    return name


class _NameOnly(ApiModel):
    name: CredentialName


# --- protos -----------------------------------------------------------------------------------------------


def credential_spec_to_proto(spec: ApiKeySpec | OAuth2Spec) -> integrator_pb2.CredentialSpec:
    """The proto of a validated credential, secrets included (the gateway's half of PutCredential)."""
    out = integrator_pb2.CredentialSpec(hosts=spec.hosts, tools=spec.tools)
    if isinstance(spec, ApiKeySpec):
        out.api_key.value = spec.value
        out.api_key.header = spec.header
        out.api_key.prefix = spec.prefix
    else:
        out.oauth2.CopyFrom(
            integrator_pb2.OAuth2Spec(
                client_id=spec.client_id,
                client_secret=spec.client_secret,
                authorize_url=spec.authorize_url,
                token_url=spec.token_url,
                revoke_url=spec.revoke_url or "",
                scopes=spec.scopes,
                redirect_uri=spec.redirect_uri,
            )
        )
    return out


def credential_spec_from_proto(msg: integrator_pb2.CredentialSpec) -> ApiKeySpec | OAuth2Spec:
    """The credential of a PutCredential request, checked by the same model as a REST body."""
    fields: dict[str, Any] = {"hosts": list(msg.hosts)} if msg.hosts else {}
    if msg.tools:
        fields["tools"] = list(msg.tools)
    kind = msg.WhichOneof("kind")
    if kind == "api_key":
        fields["type"] = "api_key"
        if msg.api_key.value:
            fields["value"] = msg.api_key.value
        if msg.api_key.HasField("header"):
            fields["header"] = msg.api_key.header
        if msg.api_key.HasField("prefix"):
            fields["prefix"] = msg.api_key.prefix
    elif kind == "oauth2":
        fields["type"] = "oauth2"
        oauth2 = msg.oauth2
        for name in ("client_id", "client_secret", "authorize_url", "token_url", "revoke_url", "redirect_uri"):
            if getattr(oauth2, name):
                fields[name] = getattr(oauth2, name)
        if oauth2.scopes:
            fields["scopes"] = list(oauth2.scopes)
    return parse_credential_spec(fields)


def credential_to_proto(meta: dict[str, Any]) -> integrator_pb2.Credential:
    """The proto of stored credential metadata."""
    out = integrator_pb2.Credential(
        name=meta["name"],
        type=enum_value(_AUTH, meta["type"]),  # type: ignore[arg-type]
        hosts=meta.get("hosts", []),
        tools=meta.get("tools", []),
        status=enum_value(_STATUS, meta.get("status", "connected")),  # type: ignore[arg-type]
        created_at=timestamp(meta["created_at"]),
        updated_at=timestamp(meta["updated_at"]),
    )
    if meta["type"] == "api_key":
        out.header, out.prefix = meta["header"], meta["prefix"]
    else:
        out.oauth2.CopyFrom(
            integrator_pb2.OAuth2Spec(
                client_id=meta["client_id"],
                authorize_url=meta["authorize_url"],
                token_url=meta["token_url"],
                revoke_url=meta.get("revoke_url") or "",
                scopes=meta.get("scopes", []),
                redirect_uri=meta["redirect_uri"],
            )
        )
    return out


# --- REST -------------------------------------------------------------------------------------------------


def credential_status_name(status: int) -> str:
    """``connected``, ``pending``, ... of a CredentialStatus."""
    return enum_name(_STATUS, status) or "error"


def credential_json(msg: integrator_pb2.Credential) -> dict[str, Any]:
    """The REST form of credential metadata (the :class:`Credential` model)."""
    kind = enum_name(_AUTH, msg.type) or "api_key"
    body: dict[str, Any] = {
        "name": msg.name,
        "type": kind,
        "status": credential_status_name(msg.status),
        "hosts": list(msg.hosts),
    }
    if msg.tools:
        body["tools"] = list(msg.tools)
    if kind == "api_key":
        body.update(header=msg.header, prefix=msg.prefix)
    else:
        oauth2 = msg.oauth2
        body.update(
            client_id=oauth2.client_id,
            authorize_url=oauth2.authorize_url,
            token_url=oauth2.token_url,
            revoke_url=oauth2.revoke_url or None,
            scopes=list(oauth2.scopes),
            redirect_uri=oauth2.redirect_uri,
        )
    body.update(created_at=rfc3339(msg.created_at), updated_at=rfc3339(msg.updated_at))
    return body
