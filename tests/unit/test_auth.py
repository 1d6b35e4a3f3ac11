"""altan.auth.TokenVerifier against API.md "Authentication": every bad token is Unauthenticated, the algorithms
come from configuration only, and RS256/ES256 keys come from a JWKS file or a JWKS URL served over real HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import ValidationError

from altan.auth import TokenVerifier, issue_development_token
from altan.config import Settings
from altan.context import RequestContext
from altan.errors import Unauthenticated

SECRET = "unit-test-hs256-secret-that-is-long-enough-for-sha256-and-then-some"  # >= 64 bytes
assert len(SECRET) >= 64


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings read the environment: keep the developer's shell out of these tests."""
    for name in list(os.environ):
        if name.startswith("ALTAN_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("ALTAN_DATA_DIR", str(tmp_path / "data"))


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for tenant ``acme``; a value of ``None`` removes the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "tenant_id": "acme",
        "sub": "alice",
        "role": "admin",
        "aud": "altan",
        "iss": "altan-dev",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(payload: dict[str, Any], secret: bytes, kid: str | None = None) -> str:
    """An HS256 token signed by hand (PyJWT refuses to use a PEM public key as an HMAC secret, attackers don't)."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@pytest.fixture
def hs_verifier() -> TokenVerifier:
    return TokenVerifier(Settings(jwt_secret=SECRET))


def rejected(verifier: TokenVerifier, authorization: str | None) -> str:
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(authorization)
    return caught.value.message


# --- HS256 -----------------------------------------------------------------------------------------------------


def test_valid_hs256_token_becomes_the_request_context(hs_verifier: TokenVerifier) -> None:
    token = hs256(claims())
    ctx = hs_verifier.verify(f"Bearer {token}")
    assert ctx == RequestContext(tenant_id="acme", user="alice", role="admin", token=token)
    assert ctx.is_admin


def test_scheme_is_case_insensitive_and_role_defaults_to_member(hs_verifier: TokenVerifier) -> None:
    token = hs256(claims(role=None, sub=None))
    ctx = hs_verifier.verify(f"bearer {token}")
    assert (ctx.tenant_id, ctx.user, ctx.role, ctx.token) == ("acme", "", "member", token)
    assert not ctx.is_admin


@pytest.mark.parametrize("authorization", [None, "", "   "])
def test_missing_header(hs_verifier: TokenVerifier, authorization: str | None) -> None:
    rejected(hs_verifier, authorization)


@pytest.mark.parametrize("scheme", ["Basic", "Token", "", "Bearer:"])
def test_non_bearer_scheme(hs_verifier: TokenVerifier, scheme: str) -> None:
    rejected(hs_verifier, f"{scheme} {hs256(claims())}".strip())


def test_bearer_without_token(hs_verifier: TokenVerifier) -> None:
    rejected(hs_verifier, "Bearer")
    rejected(hs_verifier, "Bearer    ")


@pytest.mark.parametrize(
    "garbage", ["abc", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30", "Bearer x", "\u00e9.\u00e9.\u00e9"]
)
def test_garbage_token(hs_verifier: TokenVerifier, garbage: str) -> None:
    rejected(hs_verifier, f"Bearer {garbage}")


def test_bad_signature(hs_verifier: TokenVerifier) -> None:
    rejected(hs_verifier, f"Bearer {hs256(claims(), secret='another-secret-' * 5)}")


def test_tampered_payload_is_refused(hs_verifier: TokenVerifier) -> None:
    header, _, signature = hs256(claims()).split(".")
    forged_payload = b64url(json.dumps(claims(tenant_id="victim")).encode())
    rejected(hs_verifier, f"Bearer {header}.{forged_payload}.{signature}")


def test_alg_none_is_refused(hs_verifier: TokenVerifier) -> None:
    unsigned = jwt.encode(claims(), "", algorithm="none")
    rejected(hs_verifier, f"Bearer {unsigned}")
    # Also with a dangling signature part and spelled differently.
    header = b64url(json.dumps({"alg": "None", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims()).encode())
    rejected(hs_verifier, f"Bearer {header}.{payload}.")


def test_expired_token(hs_verifier: TokenVerifier) -> None:
    assert "expired" in rejected(hs_verifier, f"Bearer {hs256(claims(exp=int(time.time()) - 3600))}")


def test_expiry_within_leeway_passes_beyond_leeway_fails() -> None:
    verifier = TokenVerifier(Settings(jwt_secret=SECRET, jwt_leeway_seconds=30))
    now = int(time.time())
    assert verifier.verify(f"Bearer {hs256(claims(exp=now - 10, iat=now - 100, nbf=now - 100))}").tenant_id == "acme"
    rejected(verifier, f"Bearer {hs256(claims(exp=now - 120, iat=now - 200, nbf=now - 200))}")


def test_nbf_in_the_future(hs_verifier: TokenVerifier) -> None:
    rejected(hs_verifier, f"Bearer {hs256(claims(nbf=int(time.time()) + 600))}")


@pytest.mark.parametrize("aud", ["other", ["other", "another"], ""])
def test_wrong_audience(hs_verifier: TokenVerifier, aud: Any) -> None:
    rejected(hs_verifier, f"Bearer {hs256(claims(aud=aud))}")


def test_audience_list_containing_ours_passes(hs_verifier: TokenVerifier) -> None:
    assert hs_verifier.verify(f"Bearer {hs256(claims(aud=['other', 'altan']))}").tenant_id == "acme"


def test_wrong_issuer(hs_verifier: TokenVerifier) -> None:
    rejected(hs_verifier, f"Bearer {hs256(claims(iss='someone-else'))}")


def test_configured_audience_and_issuer_are_used() -> None:
    verifier = TokenVerifier(Settings(jwt_secret=SECRET, jwt_audience="api", jwt_issuer="https://idp.example"))
    good = claims(aud="api", iss="https://idp.example")
    assert verifier.verify(f"Bearer {hs256(good)}").user == "alice"
    rejected(verifier, f"Bearer {hs256(claims())}")


@pytest.mark.parametrize("missing", ["tenant_id", "exp", "aud", "iss"])
def test_missing_required_claim(hs_verifier: TokenVerifier, missing: str) -> None:
    rejected(hs_verifier, f"Bearer {hs256(claims(**{missing: None}))}")


@pytest.mark.parametrize("role", ["owner", "ADMIN", "", 1, ["admin"]])
def test_invalid_role(hs_verifier: TokenVerifier, role: Any) -> None:
    rejected(hs_verifier, f"Bearer {hs256(claims(role=role))}")


@pytest.mark.parametrize("tenant", ["", "a:b", ":", 42, ["acme"], "t" * 129])
def test_invalid_tenant(hs_verifier: TokenVerifier, tenant: Any) -> None:
    rejected(hs_verifier, f"Bearer {hs256(claims(tenant_id=tenant))}")


def test_rs256_token_refused_when_only_hs256_is_configured(hs_verifier: TokenVerifier, rsa_key: Any) -> None:
    rejected(hs_verifier, f"Bearer {jwt.encode(claims(), rsa_key, algorithm='RS256')}")


def test_hs512_token_refused_when_only_hs256_is_configured(hs_verifier: TokenVerifier) -> None:
    rejected(hs_verifier, f"Bearer {jwt.encode(claims(), SECRET, algorithm='HS512')}")


def test_development_token_round_trips() -> None:
    settings = Settings(jwt_secret=SECRET)
    token = issue_development_token(settings, tenant="t1", sub="bob", role="member", ttl=60)
    ctx = TokenVerifier(settings).verify(f"Bearer {token}")
    assert ctx == RequestContext(tenant_id="t1", user="bob", role="member", token=token)


def test_development_token_needs_a_secret(rsa_jwks_file: Path) -> None:
    with pytest.raises(ValueError, match="ALTAN_JWT_SECRET"):
        issue_development_token(Settings(jwt_jwks_file=rsa_jwks_file), tenant="t", sub="u")


# --- RS256 / ES256 from a JWKS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    ec_jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    assert isinstance(rsa_jwk, dict) and isinstance(ec_jwk, dict)
    return {"keys": [{**rsa_jwk, "kid": "rsa-1", "use": "sig"}, {**ec_jwk, "kid": "ec-1", "use": "sig"}]}


@pytest.fixture(scope="module")
def jwks_file(jwks: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps(jwks))
    return path


@pytest.fixture(scope="module")
def rsa_jwks_file(jwks: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jwks") / "rsa-only.json"
    path.write_text(json.dumps({"keys": [jwks["keys"][0]]}))
    return path


@dataclass
class JwksServer:
    url: str
    requests: list[str]


@pytest.fixture(scope="module")
def jwks_server(jwks: dict[str, Any]) -> Iterator[JwksServer]:
    """The JWKS over real HTTP on 127.0.0.1, as an identity provider would serve it."""
    body = json.dumps(jwks).encode()
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            if self.path != "/.well-known/jwks.json":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield JwksServer(f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def signed(key: Any, algorithm: str, kid: str | None, **changes: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**changes), key, algorithm=algorithm, headers=headers)


@pytest.fixture(params=["file", "url"])
def jwks_verifier(request: pytest.FixtureRequest, jwks_file: Path, jwks_server: JwksServer) -> TokenVerifier:
    if request.param == "file":
        return TokenVerifier(Settings(jwt_jwks_file=jwks_file))
    return TokenVerifier(Settings(jwt_jwks_url=jwks_server.url))


def test_asymmetric_defaults_accept_rs256_and_es256(jwks_file: Path) -> None:
    assert Settings(jwt_jwks_file=jwks_file).jwt_algorithms == ("RS256", "ES256")


def test_rs256_with_matching_kid_passes(jwks_verifier: TokenVerifier, rsa_key: Any) -> None:
    token = signed(rsa_key, "RS256", "rsa-1")
    assert jwks_verifier.verify(f"Bearer {token}") == RequestContext("acme", "alice", "admin", token)


def test_es256_with_matching_kid_passes(jwks_verifier: TokenVerifier, ec_key: Any) -> None:
    token = signed(ec_key, "ES256", "ec-1", tenant_id="globex", role="member")
    assert jwks_verifier.verify(f"Bearer {token}") == RequestContext("globex", "alice", "member", token)


def test_unknown_kid_fails(jwks_verifier: TokenVerifier, rsa_key: Any) -> None:
    rejected(jwks_verifier, f"Bearer {signed(rsa_key, 'RS256', 'rsa-unknown')}")


def test_key_not_in_the_jwks_fails(jwks_verifier: TokenVerifier) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rejected(jwks_verifier, f"Bearer {signed(stranger, 'RS256', 'rsa-1')}")


def test_jwks_tokens_are_checked_for_claims_too(jwks_verifier: TokenVerifier, ec_key: Any) -> None:
    rejected(jwks_verifier, f"Bearer {signed(ec_key, 'ES256', 'ec-1', exp=int(time.time()) - 3600)}")
    rejected(jwks_verifier, f"Bearer {signed(ec_key, 'ES256', 'ec-1', aud='other')}")
    rejected(jwks_verifier, f"Bearer {signed(ec_key, 'ES256', 'ec-1', tenant_id=None)}")


def test_token_algorithm_not_matching_the_keys_type_is_unauthenticated(
    jwks_verifier: TokenVerifier, ec_key: Any
) -> None:
    # An ES256 signature presented under the RSA key's kid: must be a clean 401, not a crash (TypeError) -> 500.
    rejected(jwks_verifier, f"Bearer {signed(ec_key, 'ES256', 'rsa-1')}")


def test_hs256_signed_with_the_public_key_is_refused(jwks_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    """Algorithm confusion: the RSA public key (public knowledge) used as an HMAC secret."""
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, pem.strip()):
        for kid in ("rsa-1", None):
            rejected(jwks_verifier, f"Bearer {hand_signed_hs256(claims(), secret, kid)}")


def test_hs256_signed_with_the_public_key_is_refused_when_only_rs256_is_configured(
    rsa_jwks_file: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = TokenVerifier(Settings(jwt_jwks_file=rsa_jwks_file, jwt_algorithms=("RS256",)))
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    rejected(verifier, f"Bearer {hand_signed_hs256(claims(), pem, 'rsa-1')}")
    assert verifier.verify(f"Bearer {signed(rsa_key, 'RS256', 'rsa-1')}").tenant_id == "acme"


def test_es256_refused_when_only_rs256_is_configured(jwks_file: Path, ec_key: Any) -> None:
    verifier = TokenVerifier(Settings(jwt_jwks_file=jwks_file, jwt_algorithms=("RS256",)))
    rejected(verifier, f"Bearer {signed(ec_key, 'ES256', 'ec-1')}")


def test_jwks_url_is_fetched_over_http_and_cached(jwks_server: JwksServer, rsa_key: Any) -> None:
    verifier = TokenVerifier(Settings(jwt_jwks_url=jwks_server.url))
    before = len(jwks_server.requests)
    for _ in range(3):
        verifier.verify(f"Bearer {signed(rsa_key, 'RS256', 'rsa-1')}")
    assert jwks_server.requests[before:] == ["/.well-known/jwks.json"]


def test_unreachable_jwks_url_is_unauthenticated(rsa_key: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    verifier = TokenVerifier(Settings(jwt_jwks_url=f"http://127.0.0.1:{port}/jwks.json"))
    rejected(verifier, f"Bearer {signed(rsa_key, 'RS256', 'rsa-1')}")


# --- Settings guard the verifier's configuration ---------------------------------------------------------------


def test_leeway_above_60_seconds_is_rejected() -> None:
    assert Settings(jwt_secret=SECRET, jwt_leeway_seconds=60).jwt_leeway_seconds == 60
    with pytest.raises(ValidationError, match="jwt_leeway_seconds"):
        Settings(jwt_secret=SECRET, jwt_leeway_seconds=61)


def test_hs_algorithms_need_a_secret(jwks_file: Path) -> None:
    with pytest.raises(ValidationError, match="HS\\* algorithms need ALTAN_JWT_SECRET"):
        Settings(jwt_algorithms=("HS256",), jwt_jwks_file=jwks_file)


def test_mixing_hs256_with_rs256_is_rejected(jwks_file: Path) -> None:
    with pytest.raises(ValidationError, match="must not mix"):
        Settings(jwt_secret=SECRET, jwt_jwks_file=jwks_file, jwt_algorithms=("HS256", "RS256"))


def test_asymmetric_algorithms_need_a_jwks() -> None:
    with pytest.raises(ValidationError, match="JWKS"):
        Settings()
    with pytest.raises(ValidationError, match="JWKS"):
        Settings(jwt_algorithms=("RS256",))


@pytest.mark.parametrize("algorithms", [("none",), ("HS256", "none"), ("NONE",), ("hs256",)])
def test_none_and_unknown_algorithms_are_rejected(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError, match="unsupported JWT algorithms"):
        Settings(jwt_secret=SECRET, jwt_algorithms=algorithms)
