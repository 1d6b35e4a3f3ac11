"""Internal task delegations (altan.delegation, altan.auth): ES256 signed by the agent's private key, verified with
public keys only. Refused: another key, HS256 (the public key used as an HMAC secret included), alg=none, an unknown
kid; accepted: every key of a rotation. Only the agent may hold the private key."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from altan import context
from altan.auth import TokenVerifier, issue_delegation
from altan.config import ConfigurationError, Settings, configuration_problems
from altan.delegation import (
    SigningKey,
    agent_signing_key,
    generate_key_pair,
    key_id,
    load_public_keys,
    load_signing_key,
    refuse_signing_key,
)
from altan.errors import PermissionDenied, Unauthenticated


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("ALTAN_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("ALTAN_DATA_DIR", str(tmp_path / "data"))


def _new_key() -> SigningKey:
    key = ec.generate_private_key(ec.SECP256R1())
    return SigningKey(key, key_id(key.public_key()))


def _public_pem(*keys: SigningKey) -> bytes:
    return b"".join(
        k.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for k in keys
    )


def _verifier(tmp_path: Path, *keys: SigningKey, content: bytes | None = None) -> TokenVerifier:
    path = tmp_path / "public-keys.pem"
    path.write_bytes(content if content is not None else _public_pem(*keys))
    settings = Settings(jwt_secret="s" * 32, delegation_public_keys_file=path)
    return TokenVerifier(settings, accept_delegation=True)


def _issue(key: SigningKey, **changes: Any) -> str:
    return issue_delegation(key, tenant="acme", sub="alice", role="member", task_id="tsk_1", ttl=60, **changes)


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_delegation_is_accepted_only_where_asked_and_acts_for_its_task_only(tmp_path: Path) -> None:
    agent = _new_key()
    internal = _verifier(tmp_path, agent)
    token = _issue(agent)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": agent.kid, "typ": "JWT"}
    caller = internal.verify(f"Bearer {token}")
    assert (caller.tenant_id, caller.user, caller.role, caller.task_id) == ("acme", "alice", "member", "tsk_1")
    assert caller.delegated
    # The gateway's verifier (no accept_delegation) refuses even a genuine one.
    settings = Settings(jwt_secret="s" * 32, delegation_public_keys_file=tmp_path / "public-keys.pem")
    with pytest.raises(Unauthenticated, match="not accepted here"):
        TokenVerifier(settings).verify(f"Bearer {token}")
    # Expired: refused.
    claims = _claims(token) | {"exp": int(time.time()) - 120}
    expired = jwt.encode(claims, agent.key, algorithm="ES256", headers={"kid": agent.kid})
    with pytest.raises(Unauthenticated, match="delegation expired"):
        internal.verify(f"Bearer {expired}")
    # It acts for its own task only.
    context.bind(caller)
    context.with_task("tsk_1")
    with pytest.raises(PermissionDenied):
        context.with_task("tsk_2")


def test_a_token_signed_by_another_key_is_refused_even_under_the_right_kid(tmp_path: Path) -> None:
    agent, intruder = _new_key(), _new_key()
    internal = _verifier(tmp_path, agent)
    for forged in (_issue(intruder), _issue(SigningKey(intruder.key, agent.kid))):
        with pytest.raises(Unauthenticated, match="invalid delegation"):
            internal.verify(f"Bearer {forged}")


def test_hs256_and_none_are_refused_whatever_the_key(tmp_path: Path) -> None:
    agent = _new_key()
    internal = _verifier(tmp_path, agent)
    claims = _claims(_issue(agent))
    public_pem = _public_pem(agent)
    forged = [
        # HS256 with a secret of the verifier's choosing, and with the public key itself as the HMAC secret
        # (algorithm confusion): pyjwt would refuse the PEM as a key, so sign by hand as an attacker would.
        jwt.encode(claims, "x" * 40, algorithm="HS256", headers={"kid": agent.kid}),
    ]
    header = _b64(json.dumps({"alg": "HS256", "kid": agent.kid, "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    forged.append(f"{header}.{body}.{_b64(signature)}")
    none_header = _b64(json.dumps({"alg": "none", "kid": agent.kid}).encode())
    forged.append(f"{none_header}.{body}.")
    for token in forged:
        with pytest.raises(Unauthenticated, match="invalid delegation"):
            internal.verify(f"Bearer {token}")


def test_an_unknown_or_missing_kid_is_refused(tmp_path: Path) -> None:
    agent = _new_key()
    internal = _verifier(tmp_path, agent)
    claims = _claims(_issue(agent))
    for headers in ({"kid": "unknown"}, {}):
        token = jwt.encode(claims, agent.key, algorithm="ES256", headers=headers)
        with pytest.raises(Unauthenticated, match="invalid delegation"):
            internal.verify(f"Bearer {token}")


def test_a_rotation_accepts_old_and_new_and_then_only_the_new(tmp_path: Path) -> None:
    old, new = _new_key(), _new_key()
    during = _verifier(tmp_path, old, new)
    for key in (old, new):
        assert during.verify(f"Bearer {_issue(key)}").tenant_id == "acme"
    after = _verifier(tmp_path, new)
    assert after.verify(f"Bearer {_issue(new)}").tenant_id == "acme"
    with pytest.raises(Unauthenticated, match="invalid delegation"):
        after.verify(f"Bearer {_issue(old)}")


def _certificate(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "altan-delegation")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(days=1))  # expired: only its public key counts
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_public_keys_may_come_as_certificates_as_the_chart_gives_them(tmp_path: Path) -> None:
    agent, other = _new_key(), _new_key()
    internal = _verifier(tmp_path, content=_certificate(agent.key) + b"\n" + _public_pem(other))
    assert internal.verify(f"Bearer {_issue(agent)}").delegated
    assert internal.verify(f"Bearer {_issue(other)}").delegated


def _write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "keys.pem"
    path.write_bytes(content)
    return path


def test_bad_key_files_are_refused_in_one_line(tmp_path: Path) -> None:
    agent = _new_key()
    private_pem = agent.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigurationError, match="holds a private key: verifiers get public keys only"):
        load_public_keys(_write(tmp_path, _public_pem(agent) + private_pem))
    with pytest.raises(ConfigurationError, match="holds no PEM public key"):
        load_public_keys(_write(tmp_path, b"not a key"))
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for key in (p384, rsa_key.public_key()):
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(ConfigurationError, match=r"block 1 of .* is not a P-256"):
            load_public_keys(_write(tmp_path, pem))
    with pytest.raises(ConfigurationError, match="ALTAN_DELEGATION_PUBLIC_KEYS_FILE: cannot read"):
        load_public_keys(tmp_path / "missing.pem")
    with pytest.raises(ConfigurationError, match="not an unencrypted PEM P-256"):
        load_signing_key(_write(tmp_path, _public_pem(agent)))
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigurationError, match="not an unencrypted PEM P-256"):
        load_signing_key(_write(tmp_path, rsa_pem))
    # The SEC1 form Helm's genPrivateKey "ecdsa" writes is read as well.
    sec1 = agent.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    assert sec1.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert load_signing_key(_write(tmp_path, sec1)).kid == agent.kid


def test_the_agent_refuses_a_key_the_verifiers_do_not_hold(tmp_path: Path) -> None:
    private, public = generate_key_pair(tmp_path / "pair")
    assert agent_signing_key(
        Settings(jwt_secret="s" * 32, delegation_signing_key_file=private, delegation_public_keys_file=public)
    )
    other = _write(tmp_path, _public_pem(_new_key()))
    settings = Settings(jwt_secret="s" * 32, delegation_signing_key_file=private, delegation_public_keys_file=other)
    with pytest.raises(ConfigurationError, match=r"its public key \(kid .*\) is not in ALTAN_DELEGATION_PUBLIC"):
        agent_signing_key(settings)
    alone = Settings(jwt_secret="s" * 32, delegation_signing_key_file=private)
    with pytest.raises(ConfigurationError, match="needs ALTAN_DELEGATION_PUBLIC_KEYS_FILE"):
        agent_signing_key(alone)


def test_only_the_agent_may_hold_the_private_key(tmp_path: Path) -> None:
    private, public = generate_key_pair(tmp_path / "pair")
    refuse_signing_key(Settings(jwt_secret="s" * 32, delegation_public_keys_file=public), "tool service")
    with pytest.raises(ConfigurationError, match="only the agent signs delegations; the tool service must not"):
        refuse_signing_key(Settings(jwt_secret="s" * 32, delegation_signing_key_file=private), "tool service")


def test_the_generated_pair_is_kept_and_its_private_key_private(tmp_path: Path) -> None:
    private, public = generate_key_pair(tmp_path / "pair")
    assert private.stat().st_mode & 0o777 == 0o600
    kid = load_signing_key(private).kid
    assert list(load_public_keys(public)) == [kid]
    assert generate_key_pair(tmp_path / "pair") == (private, public)
    assert load_signing_key(private).kid == kid


def test_the_symmetric_internal_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALTAN_INTERNAL_KEY", "x" * 48)
    with pytest.raises(ValidationError) as refused:
        Settings()
    (line,) = configuration_problems(refused.value)
    assert line.startswith("ALTAN_INTERNAL_KEY: no longer read: delegations are signed with")
    assert "x" * 48 not in line
