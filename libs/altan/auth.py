"""Tenant JWT verification, exactly as API.md's "Authentication" says.

Algorithms come from configuration, never from the token header; ``exp``, ``aud``, ``iss`` and ``tenant_id``
are required; clock leeway is at most 60 s (enforced by Settings). HS256 with a shared secret is for development;
production uses RS256/ES256 public keys from a JWKS file or URL.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import jwt

from altan.config import Settings
from altan.context import RequestContext
from altan.delegation import SigningKey, load_public_keys
from altan.errors import Unauthenticated

__all__ = ["DELEGATION_ISSUER", "TokenVerifier", "issue_delegation", "issue_development_token"]

_ROLES = ("admin", "member")
# Issuer and audience of the internal delegation tokens the agent signs for its tasks (issue_delegation): no tenant
# identity provider may use them, and the gateway refuses them whoever signed them.
DELEGATION_ISSUER = "altan-internal"
# Fixed, never taken from the token: the agent signs with its P-256 private key, verifiers hold public keys only.
_DELEGATION_ALGORITHM = "ES256"
_CACHE_SIZE = 10_000
_MAX_TOKEN_CHARS = 8 * 1024


class TokenVerifier:
    """Verifies bearer tokens and turns their claims into a :class:`RequestContext`."""

    def __init__(self, settings: Settings, *, accept_delegation: bool = False) -> None:
        # Only the internal services accept delegations, and only with the install's public keys configured
        # (kid -> key; loaded now, so that a bad file stops the process at start with one line).
        self._delegation_keys = (
            load_public_keys(settings.delegation_public_keys_file)
            if accept_delegation and settings.delegation_public_keys_file is not None
            else None
        )
        self._algorithms = list(settings.jwt_algorithms)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_seconds
        self._secret = settings.jwt_secret
        self._jwks_client = (
            jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True, lifespan=300, timeout=5)
            if settings.jwt_jwks_url and not self._secret
            else None
        )
        self._jwks: jwt.PyJWKSet | None = None
        # token -> (expiry, caller): a token verified once is not re-verified on every hop until it expires.
        self._verified: OrderedDict[str, tuple[float, RequestContext]] = OrderedDict()
        if settings.jwt_jwks_file and not self._secret:
            self._jwks = jwt.PyJWKSet.from_dict(json.loads(settings.jwt_jwks_file.read_text()))

    def verify(self, authorization: str | None) -> RequestContext:
        """Check an ``Authorization: Bearer`` value; raise :class:`Unauthenticated` on anything wrong."""
        if not authorization:
            raise Unauthenticated("missing bearer token")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        if len(token) > _MAX_TOKEN_CHARS:
            raise Unauthenticated("token too large")  # it would not fit in gRPC metadata on the next hop
        cached = self._verified.get(token)
        if cached is not None:
            if time.time() < cached[0]:
                return cached[1]
            del self._verified[token]
        if _issuer(token) == DELEGATION_ISSUER:
            return self._delegation(token)
        try:
            claims = jwt.decode(
                token,
                key=self._key_for(token),
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "aud", "iss", "tenant_id"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated("token audience not accepted") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated("token issuer not accepted") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the '{exc.claim}' claim") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise Unauthenticated("token algorithm not accepted") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise Unauthenticated("invalid token") from exc
        caller = self._context(claims, token)
        self._remember(token, float(claims["exp"]) + self._leeway, caller)
        return caller

    def _delegation(self, token: str) -> RequestContext:
        """An internal delegation: signed by the agent's private key, for one task, accepted on internal ports only."""
        if self._delegation_keys is None:
            raise Unauthenticated("internal delegation tokens are not accepted here")
        try:
            key = self._delegation_keys.get(str(jwt.get_unverified_header(token).get("kid")))
            if key is None:
                raise jwt.InvalidKeyError("no delegation key matches the token's kid")
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[_DELEGATION_ALGORITHM],
                audience=DELEGATION_ISSUER,
                issuer=DELEGATION_ISSUER,
                leeway=self._leeway,
                options={"require": ["exp", "aud", "iss", "tenant_id", "task_id"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("delegation expired") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise Unauthenticated("invalid delegation") from exc
        task_id = claims.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise Unauthenticated("invalid delegation")
        caller = replace(self._context(claims, token), task_id=task_id, delegated=True)
        self._remember(token, float(claims["exp"]) + self._leeway, caller)
        return caller

    def _remember(self, token: str, expires: float, caller: RequestContext) -> None:
        self._verified[token] = (expires, caller)
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)  # the oldest entry

    def _key_for(self, token: str) -> Any:
        if self._secret:
            return self._secret
        # A PyJWK (not its raw key) lets PyJWT refuse a token whose algorithm does not fit the key's type.
        if self._jwks_client is not None:
            return self._jwks_client.get_signing_key_from_jwt(token)
        assert self._jwks is not None
        kid = jwt.get_unverified_header(token).get("kid")
        for key in self._jwks.keys:
            if kid is None or key.key_id == kid:
                return key
        raise jwt.InvalidKeyError("no key matches the token's kid")

    @staticmethod
    def _context(claims: dict[str, Any], token: str) -> RequestContext:
        tenant = claims.get("tenant_id")
        if not isinstance(tenant, str) or not tenant or len(tenant) > 128 or ":" in tenant:
            raise Unauthenticated("token has an invalid 'tenant_id' claim")
        role = claims.get("role", "member")
        if role not in _ROLES:
            raise Unauthenticated("token has an invalid 'role' claim")
        user = claims.get("sub")
        try:
            tenant.encode()
            str(user or "").encode()
        except UnicodeEncodeError:
            raise Unauthenticated("token claims must be valid Unicode") from None
        return RequestContext(tenant_id=tenant, user=str(user) if user else "", role=role, token=token)


def _issuer(token: str) -> object:
    """The ``iss`` a token claims, unverified: it only chooses which key verifies the token."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        return None  # the ordinary path says what is wrong with it


def issue_delegation(key: SigningKey, *, tenant: str, sub: str, role: str, task_id: str, ttl: float) -> str:
    """A delegation for one task: the agent runs (and resumes) the task as its submitter with it, after the
    submitter's own token may have expired. Signed (ES256) with the agent's private key; ``ttl`` seconds."""
    now = int(time.time())
    claims = {
        "tenant_id": tenant,
        "sub": sub,
        "role": role,
        "task_id": task_id,
        "aud": DELEGATION_ISSUER,
        "iss": DELEGATION_ISSUER,
        "iat": now,
        "exp": now + max(1, int(ttl)),
    }
    return jwt.encode(claims, key.key, algorithm=_DELEGATION_ALGORITHM, headers={"kid": key.kid})


def issue_development_token(settings: Settings, *, tenant: str, sub: str, role: str = "admin", ttl: int = 3600) -> str:
    """A token signed with the development HS256 secret (``altan token``)."""
    if not settings.jwt_secret:
        raise ValueError("ALTAN_JWT_SECRET is not set: development tokens need it")
    now = int(time.time())
    claims = {
        "tenant_id": tenant,
        "sub": sub,
        "role": role,
        "aud": settings.jwt_audience,
        "iss": settings.jwt_issuer,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
    }
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
