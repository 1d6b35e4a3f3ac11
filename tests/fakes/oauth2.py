"""A fake OAuth2 provider on a real socket (127.0.0.1), strict where real providers are strict.

- ``GET /authorize``: the user's consent, given at once: checks the client, the exact registered redirect URI and
  the S256 code challenge, then redirects (302) to the redirect URI with a one-time code and the state.
- ``POST /token``: client authentication (HTTP Basic or the body), ``authorization_code`` (the PKCE verifier must
  hash to the challenge; a code works once) and ``refresh_token``. Refresh tokens rotate: each works once, and a
  reused one is ``invalid_grant`` and revokes its whole family (its newer refresh and access tokens), as real
  providers do on a suspected theft.
- ``POST /revoke`` (RFC 7009): revokes the token's family; 200 even for an unknown token.
- ``GET /api/me``: the protected resource a tool calls, 401 without a live access token.

"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

__all__ = ["FakeOAuth2Provider", "start_fake_oauth2_provider"]


@dataclass
class _Client:
    secret: str
    redirect_uri: str


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str


@dataclass
class FakeOAuth2Provider:
    server: ThreadingHTTPServer
    expires_in: int = 3600  # of the access tokens it issues from now on
    refresh_delay: float = 0.0  # how long a refresh takes (a slow provider widens a race)
    clients: dict[str, _Client] = field(default_factory=dict)
    codes: dict[str, _Code] = field(default_factory=dict)
    access_tokens: dict[str, tuple[float, str]] = field(default_factory=dict)  # token -> (expires at, family)
    refresh_tokens: dict[str, tuple[str, bool]] = field(default_factory=dict)  # token -> (family, used)
    revoked_families: set[str] = field(default_factory=set)
    family_clients: dict[str, str] = field(default_factory=dict)  # family -> client_id
    # What happened, for tests: grant types served, refused grants, revocation requests, Authorization headers seen.
    grants: list[str] = field(default_factory=list)
    invalid_grants: int = 0
    revocations: list[tuple[str, str]] = field(default_factory=list)  # (token, token_type_hint)
    resource_calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def register(self, client_id: str, secret: str, redirect_uri: str) -> None:
        with self.lock:
            self.clients[client_id] = _Client(secret, redirect_uri)

    def refreshes(self) -> int:
        with self.lock:
            return self.grants.count("refresh_token")

    def tokens_of(self, client_id: str) -> list[str]:
        """Every access and refresh token issued to the client."""
        with self.lock:
            families = {f for f, c in self.family_clients.items() if c == client_id}
            return [t for t, (_, f) in self.access_tokens.items() if f in families] + [
                t for t, (f, _) in self.refresh_tokens.items() if f in families
            ]

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working (a provider that revoked them early)."""
        with self.lock:
            self.access_tokens = {t: (0.0, family) for t, (_, family) in self.access_tokens.items()}

    def revoke_everything(self) -> None:
        """Every token issued so far dies (the user removed the app at the provider)."""
        with self.lock:
            self.revoked_families.update(family for family, _ in self.refresh_tokens.values())

    def live_access_token(self, token: str) -> bool:
        with self.lock:
            found = self.access_tokens.get(token)
            return found is not None and found[0] > time.monotonic() and found[1] not in self.revoked_families

    # --- endpoints (called by the handler, under no lock) -------------------------------------------------

    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str], dict[str, Any]]:
        client = self.clients.get(query.get("client_id", ""))
        if client is None or query.get("redirect_uri") != client.redirect_uri:
            return 400, {}, {"error": "invalid_request", "error_description": "unknown client or redirect_uri"}
        if query.get("response_type") != "code" or query.get("code_challenge_method") != "S256":
            return 400, {}, {"error": "invalid_request", "error_description": "code with S256 PKCE only"}
        if not query.get("code_challenge") or not query.get("state"):
            return 400, {}, {"error": "invalid_request", "error_description": "code_challenge and state required"}
        code = secrets.token_urlsafe(16)
        with self.lock:
            self.codes[code] = _Code(
                query["client_id"], client.redirect_uri, query["code_challenge"], query.get("scope", "")
            )
        location = client.redirect_uri + "?" + urlencode({"code": code, "state": query["state"]})
        return 302, {"Location": location}, {}

    def token(self, form: dict[str, str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        client_id = self._authenticate(form, authorization)
        if client_id is None:
            return 401, {"error": "invalid_client"}
        grant = form.get("grant_type", "")
        if grant == "authorization_code":
            return self._exchange(client_id, form)
        if grant == "refresh_token":
            if self.refresh_delay:
                time.sleep(self.refresh_delay)  # the provider is slow: concurrent refreshes overlap here
            return self._refresh(form)
        return 400, {"error": "unsupported_grant_type"}

    def revoke(self, form: dict[str, str], authorization: str | None) -> int:
        if self._authenticate(form, authorization) is None:
            return 401
        token = form.get("token", "")
        with self.lock:
            self.revocations.append((token, form.get("token_type_hint", "")))
            family = self.refresh_tokens.get(token, (None, False))[0] or self.access_tokens.get(token, (0, None))[1]
            if family:
                self.revoked_families.add(family)
        return 200

    # --- pieces ----------------------------------------------------------------------------------------------

    def _authenticate(self, form: dict[str, str], authorization: str | None) -> str | None:
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if authorization and authorization.startswith("Basic "):
            decoded = base64.b64decode(authorization[6:]).decode()
            client_id, _, secret = decoded.partition(":")
            client_id, secret = unquote(client_id), unquote(secret)
        client = self.clients.get(client_id)
        return client_id if client is not None and secrets.compare_digest(client.secret, secret) else None

    def _exchange(self, client_id: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.grants.append("authorization_code")
            code = self.codes.pop(form.get("code", ""), None)  # one use, whatever happens next
        if code is None or code.client_id != client_id or form.get("redirect_uri") != code.redirect_uri:
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not verifier or not secrets.compare_digest(challenge, code.challenge):
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        with self.lock:
            family = secrets.token_hex(8)
            self.family_clients[family] = client_id
            return 200, self._issue(family, code.scope)

    def _refresh(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.grants.append("refresh_token")
            family, used = self.refresh_tokens.get(form.get("refresh_token", ""), ("", False))
            if not family or family in self.revoked_families:
                self.invalid_grants += 1
                return 400, {"error": "invalid_grant"}
            if used:  # a rotated-away refresh token came back: assume theft, kill the family
                self.revoked_families.add(family)
                self.invalid_grants += 1
                return 400, {"error": "invalid_grant", "error_description": "refresh token reused"}
            self.refresh_tokens[form["refresh_token"]] = (family, True)
            return 200, self._issue(family, "")

    def _issue(self, family: str, scope: str) -> dict[str, Any]:
        access, refresh = "at-" + secrets.token_urlsafe(16), "rt-" + secrets.token_urlsafe(16)
        self.access_tokens[access] = (time.monotonic() + self.expires_in, family)
        self.refresh_tokens[refresh] = (family, False)
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": refresh,
        }
        if scope:
            answer["scope"] = scope
        return answer


def _handler(fake: FakeOAuth2Provider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _answer(
            self, status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(body or {}).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _form(self) -> dict[str, str]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode()
            return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/authorize":
                status, headers, body = fake.authorize({k: v[0] for k, v in parse_qs(url.query).items()})
                self._answer(status, body, headers)
            elif url.path == "/api/me":
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                with fake.lock:
                    fake.resource_calls.append(token)
                if fake.live_access_token(token):
                    self._answer(200, {"user": "ada", "plan": "gold"})
                else:
                    self._answer(401, {"error": "invalid_token"}, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            else:
                self._answer(404, {"error": "not_found"})

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            authorization = self.headers.get("Authorization")
            if path == "/token":
                status, body = fake.token(self._form(), authorization)
                self._answer(status, body)
            elif path == "/revoke":
                self._answer(fake.revoke(self._form(), authorization))
            else:
                self._answer(404, {"error": "not_found"})

    return Handler


def start_fake_oauth2_provider(port: int = 0) -> FakeOAuth2Provider:
    """Serve in a background thread; stop with ``fake.server.shutdown()`` and ``fake.server.server_close()``."""
    server = ThreadingHTTPServer(("127.0.0.1", port), BaseHTTPRequestHandler)
    fake = FakeOAuth2Provider(server)
    server.RequestHandlerClass = _handler(fake)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return fake
