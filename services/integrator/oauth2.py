"""OAuth2 credentials: the authorization-code flow with PKCE, tokens kept fresh across replicas, revocation.

authlib builds the protocol's pieces (the grant URI with its S256 challenge, token and revocation request bodies,
client authentication); every request goes through the egress-guarded client, like any other outbound call.

- ``state`` is 32 random bytes, kept (as its SHA-256, with the PKCE verifier, the tenant, the user and the
  credential) in the state store for ``ALTAN_OAUTH2_STATE_TTL_SECONDS``, outside any tenant: the callback comes from
  a browser without a token, and the state alone says whose flow it finishes. Taking it is one atomic read-and-delete
  (Redis ``GETDEL``), so of two callbacks with one state exactly one goes on, on any replica.
- A refresh happens under the tenant's lock for the credential (Redis, or an asyncio lock when embedded). Inside, the
  stored tokens are read again: when another replica already replaced the token this one found stale, that new token
  is used and nothing is sent. Otherwise the rotated tokens are written to the secret backend before the new access
  token is used, so no replica ever sends a refresh token the provider has already rotated away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from authlib.common.security import generate_token
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7009 import prepare_revoke_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from altan import context
from altan.api.convert import now_ms
from altan.errors import AltanError, FailedPrecondition, InvalidArgument
from altan.metrics import CREDENTIAL_REFRESHES, CREDENTIALS_NEEDS_REAUTH, count
from altan.outbound import GuardedHttpClient
from altan.store import SharedStore, TenantStore
from services.integrator.audit import AuditLog
from services.integrator.secrets import SecretBackend

__all__ = ["CREDENTIALS", "OAuth2Flows", "ProviderRefused"]

log = logging.getLogger(__name__)

CREDENTIALS = "credentials"  # the broker's collection of credential metadata
_STATE = "oauth2-state"
_MAX_STATE_CHARS = 512
_MAX_CODE_CHARS = 4096
# An OAuth2 error code is a short ASCII word (RFC 6749 5.2); anything else is not repeated to anyone.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_FORM = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}


class ProviderRefused(FailedPrecondition):
    """The token endpoint answered an OAuth2 error (``invalid_grant``...), or no usable token."""

    def __init__(self, what: str, error: str) -> None:
        super().__init__(f"{what}: the provider answered '{error}'")
        self.error = error


def _error_code(value: object) -> str:
    return value if isinstance(value, str) and _ERROR_CODE.fullmatch(value) else "an unreadable error"


def _digest(state: str) -> str:
    # The store holds the state's hash: whoever reads the store cannot finish someone's flow with what it finds.
    return hashlib.sha256(state.encode()).hexdigest()


class OAuth2Flows:
    """Authorization, callback, refresh and revocation of the current tenant's oauth2 credentials."""

    def __init__(
        self,
        store: TenantStore,
        pending: SharedStore,
        secrets_: SecretBackend,
        http: GuardedHttpClient,
        audit: AuditLog,
        *,
        state_ttl_seconds: float = 600.0,
        refresh_margin_seconds: float = 60.0,
        deadline_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._pending = pending
        self._secrets = secrets_
        self._http = http
        self._audit = audit
        self._state_ttl = state_ttl_seconds
        self._margin = refresh_margin_seconds
        self._deadline = deadline_seconds
        self._clock = clock
        self._needs_reauth: set[bytes] = set()  # credentials seen needing re-authorization (hashed keys)

    # --- the flow -------------------------------------------------------------------------------------------

    async def authorize(self, name: str, meta: dict[str, Any]) -> tuple[str, str]:
        """``(authorization_url, state)`` for a new authorization of ``name``, from any status."""
        caller = context.current()
        state = secrets.token_urlsafe(32)
        verifier = generate_token(64)  # RFC 7636: 43 to 128 unreserved characters
        url = prepare_grant_uri(
            meta["authorize_url"],
            meta["client_id"],
            "code",
            redirect_uri=meta["redirect_uri"],
            scope=" ".join(meta.get("scopes") or []) or None,
            state=state,
            code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256",
        )
        record = {
            "tenant": caller.tenant_id,
            "user": caller.user,
            "credential": name,
            "verifier": verifier,
            "redirect_uri": meta["redirect_uri"],
            "client_id": meta["client_id"],
        }
        await self._pending.set_expiring(_STATE, _digest(state), json.dumps(record), self._state_ttl)
        await self._audit.record("oauth2.authorize", credential=name, target=_host(meta["authorize_url"]))
        return url, state

    async def finish(self, code: str, state: str, error: str = "") -> str:
        """Exchange the code of the flow ``state`` started; binds that flow's tenant and answers the credential.

        An unknown, used or expired state is INVALID_ARGUMENT and changes nothing. The state is spent either way
        once found: a failed exchange needs a new authorization.
        """
        if not state or len(state) > _MAX_STATE_CHARS:
            raise InvalidArgument("state: unknown, already used or expired; authorize again")
        raw = await self._pending.take_expiring(_STATE, _digest(state))
        if raw is None:
            log.warning("oauth2 callback with an unknown, used or expired state")
            raise InvalidArgument("state: unknown, already used or expired; authorize again")
        record = json.loads(raw)
        # The admin who started the flow, in their tenant: what follows is theirs (store keys, audit, secrets).
        context.bind(context.RequestContext(tenant_id=record["tenant"], user=record["user"], role="admin", token=""))
        name = record["credential"]
        started = time.monotonic()
        try:
            if error:
                raise FailedPrecondition(f"the provider answered '{_error_code(error)}' instead of a code")
            if not code or len(code) > _MAX_CODE_CHARS:
                raise InvalidArgument("code: required, at most 4096 characters")
            meta = await self._store.get(CREDENTIALS, name)
            if (
                meta is None
                or meta["type"] != "oauth2"
                or (meta["redirect_uri"], meta["client_id"]) != (record["redirect_uri"], record["client_id"])
            ):
                raise FailedPrecondition(f"credential '{name}' was deleted or changed during the authorization")
            secret = await self._secret(name)
            body = prepare_token_request(
                "authorization_code", code=code, redirect_uri=record["redirect_uri"], code_verifier=record["verifier"]
            )
            try:
                token = await self._token_request(meta, secret, body, "the code exchange")
            except ProviderRefused:
                await self._set_status(name, "error")
                raise
            await self._secrets.put(name, _seal({**_without_tokens(secret), **self._tokens(token, None)}))
            await self._set_status(name, "connected")
        except AltanError as exc:
            await self._audit.record(
                "oauth2.callback", credential=name, outcome="error", reason=exc.message, latency_ms=_ms(started)
            )
            raise
        await self._audit.record(
            "oauth2.callback", credential=name, target=_host(meta["token_url"]), latency_ms=_ms(started)
        )
        return str(name)

    # --- tokens ---------------------------------------------------------------------------------------------

    async def access_token(self, name: str, meta: dict[str, Any], secret: dict[str, Any]) -> str:
        """A usable access token: the stored one, or a refreshed one when it expires within the margin."""
        token = secret.get("access_token")
        if not token:
            if meta.get("status") == "needs_reauth":
                raise FailedPrecondition(f"credential '{name}' needs re-authorization (the provider refused a refresh)")
            raise FailedPrecondition(f"credential '{name}' is not authorized yet (run the OAuth2 flow)")
        expires_at = secret.get("expires_at")
        if expires_at is None or not secret.get("refresh_token") or expires_at - self._margin > self._clock():
            return str(token)
        return await self.refresh(name, stale=str(token))

    async def refresh(self, name: str, *, stale: str) -> str:
        """A new access token in place of ``stale`` (expiring, or refused by the third party): one refresh across
        every replica; whoever waited for it uses its result."""
        async with self._store.lock(f"oauth2-refresh:{name}", self._deadline + 5, self._deadline):
            meta = await self._store.get(CREDENTIALS, name)
            if meta is None:
                raise FailedPrecondition(f"credential '{name}' not found")
            secret = await self._secret(name)
            current = secret.get("access_token")
            if current and current != stale:
                return str(current)  # another replica (or call) refreshed while this one waited
            refresh_token = secret.get("refresh_token")
            if not refresh_token:
                count(CREDENTIAL_REFRESHES, "refused")
                await self._set_status(name, "needs_reauth")
                raise FailedPrecondition(f"credential '{name}' needs re-authorization (no refresh token)")
            started = time.monotonic()
            body = prepare_token_request("refresh_token", refresh_token=refresh_token)
            try:
                token = await self._token_request(meta, secret, body, "the refresh")
            except ProviderRefused as exc:
                refused = exc.error == "invalid_grant"
                count(CREDENTIAL_REFRESHES, "refused" if refused else "error")
                if refused:  # the refresh token is dead: only the user can bring the credential back
                    await self._secrets.put(name, _seal(_without_tokens(secret)))
                await self._set_status(name, "needs_reauth" if refused else "error")
                await self._audit.record(
                    "oauth2.refresh", credential=name, outcome="error", reason=exc.message, latency_ms=_ms(started)
                )
                if refused:
                    raise FailedPrecondition(
                        f"credential '{name}' needs re-authorization: the provider refused the refresh (invalid_grant)"
                    ) from None
                raise
            except AltanError as exc:  # unreachable, refused by the egress rules: the tokens stay as they were
                count(CREDENTIAL_REFRESHES, "error")
                await self._audit.record(
                    "oauth2.refresh", credential=name, outcome="error", reason=exc.message, latency_ms=_ms(started)
                )
                raise
            fresh = {**secret, **self._tokens(token, refresh_token)}
            # Persisted before anyone uses it: the provider may have rotated the refresh token just now.
            await self._secrets.put(name, _seal(fresh))
            count(CREDENTIAL_REFRESHES, "ok")
            await self._set_status(name, "connected")
            await self._audit.record(
                "oauth2.refresh", credential=name, target=_host(meta["token_url"]), latency_ms=_ms(started)
            )
            return str(fresh["access_token"])

    async def revoke(self, name: str, meta: dict[str, Any], secret: dict[str, Any]) -> None:
        """Best effort RFC 7009 revocation of the refresh token (else the access token); audited either way."""
        revoke_url = meta.get("revoke_url")
        token, hint = secret.get("refresh_token"), "refresh_token"
        if not token:
            token, hint = secret.get("access_token"), "access_token"
        if not revoke_url or not token:
            return
        started = time.monotonic()
        body, headers = prepare_revoke_token_request(token, hint, "", dict(_FORM))
        _, headers, body = _client_auth(meta, secret).prepare("POST", revoke_url, headers, body)
        outcome, reason, target = "ok", "", _host(revoke_url)
        try:
            result = await self._http.request(
                "POST", revoke_url, headers=headers, content=body.encode(), timeout=self._deadline
            )
            target = result.target
            if result.status != 200:
                outcome, reason = "error", f"the revocation endpoint answered HTTP {result.status}"
        except AltanError as exc:
            outcome, reason = "error", exc.message
        await self._audit.record(
            "oauth2.revoke", credential=name, target=target, outcome=outcome, reason=reason, latency_ms=_ms(started)
        )

    # --- pieces ---------------------------------------------------------------------------------------------

    async def _secret(self, name: str) -> dict[str, Any]:
        raw = await self._secrets.get(name)
        if raw is None:
            raise FailedPrecondition(f"credential '{name}' has no stored secret")
        secret: dict[str, Any] = json.loads(raw)
        return secret

    async def _token_request(
        self, meta: dict[str, Any], secret: dict[str, Any], body: str, what: str
    ) -> dict[str, Any]:
        """POST to the token endpoint with client authentication; the token, or ProviderRefused."""
        url = meta["token_url"]
        _, headers, body = _client_auth(meta, secret).prepare("POST", url, dict(_FORM), body)
        result = await self._http.request("POST", url, headers=headers, content=body.encode(), timeout=self._deadline)
        try:
            token = json.loads(result.body)
        except ValueError:
            token = None
        if not isinstance(token, dict):
            raise ProviderRefused(what, f"HTTP {result.status} without a JSON token")
        if result.status >= 400 or "error" in token:
            raise ProviderRefused(
                what, _error_code(token.get("error")) if "error" in token else f"HTTP {result.status}"
            )
        if not isinstance(token.get("access_token"), str) or not token["access_token"]:
            raise ProviderRefused(what, "no access_token")
        return token

    def _tokens(self, token: dict[str, Any], previous_refresh_token: str | None) -> dict[str, Any]:
        """What is kept of a token answer; a provider that does not rotate keeps the refresh token it had."""
        expires_in = token.get("expires_in")
        expires_at = (
            int(self._clock() + float(expires_in))
            if isinstance(expires_in, int | float | str) and str(expires_in).replace(".", "", 1).isdigit()
            else None
        )
        refresh_token = token.get("refresh_token")
        return {
            "access_token": token["access_token"],
            "refresh_token": refresh_token
            if isinstance(refresh_token, str) and refresh_token
            else previous_refresh_token,
            "expires_at": expires_at,
        }

    async def _set_status(self, name: str, status: str) -> None:
        # The gauge counts what this replica saw, by an opaque key: no tenant's name reaches the metrics.
        seen = hashlib.sha256(f"{context.current().tenant_id}\0{name}".encode()).digest()
        if status == "needs_reauth":
            self._needs_reauth.add(seen)
        else:
            self._needs_reauth.discard(seen)
        CREDENTIALS_NEEDS_REAUTH.set(len(self._needs_reauth))
        meta = await self._store.get(CREDENTIALS, name)
        if meta is not None and meta.get("status") != status:
            meta.update(status=status, updated_at=now_ms())
            await self._store.put(CREDENTIALS, name, meta)


def _client_auth(meta: dict[str, Any], secret: dict[str, Any]) -> ClientAuth:
    # HTTP Basic (RFC 6749 2.3.1), which every provider must accept: the secret stays out of the body, and the guarded
    # client drops the header on a redirect to another host.
    return ClientAuth(meta["client_id"], secret["client_secret"], "client_secret_basic")


def _seal(secret: dict[str, Any]) -> bytes:
    return json.dumps(secret).encode()


def _without_tokens(secret: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in secret.items() if k not in ("access_token", "refresh_token", "expires_at")}


def _host(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2]


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
