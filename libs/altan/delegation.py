"""The key pair of the internal task delegations (ES256, P-256): the agent alone signs with the private key, every
verifier (the agent, tool and integrator services and the tool containers) holds only public keys.

A key's ``kid`` is its RFC 7638 JWK thumbprint, derived from the key itself: nothing to configure, and a verifier
given several public keys (a rotation: old and new) picks the one the token names. Public keys come as PEM
``PUBLIC KEY`` or ``CERTIFICATE`` blocks (the Helm chart derives a self-signed certificate from its generated key:
only the certificate's public key is used, not its dates or issuer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from altan.config import ConfigurationError, Settings

__all__ = [
    "PUBLIC_KEYS_SETTING",
    "SIGNING_KEY_SETTING",
    "SigningKey",
    "agent_signing_key",
    "generate_key_pair",
    "key_id",
    "load_public_keys",
    "load_signing_key",
    "refuse_signing_key",
]

SIGNING_KEY_SETTING = "ALTAN_DELEGATION_SIGNING_KEY_FILE"
PUBLIC_KEYS_SETTING = "ALTAN_DELEGATION_PUBLIC_KEYS_FILE"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class SigningKey:
    """The agent's private key and its ``kid``."""

    key: ec.EllipticCurvePrivateKey
    kid: str


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of a P-256 public key."""
    jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def _p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1
    )


def load_signing_key(path: Path) -> SigningKey:
    """The agent's private key from a PEM file (PKCS#8 or SEC1 ``EC PRIVATE KEY``, unencrypted, P-256)."""
    data = _read(path, SIGNING_KEY_SETTING)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _p256(key):
        raise ConfigurationError(f"{SIGNING_KEY_SETTING}: {path} is not an unencrypted PEM P-256 (ES256) private key")
    return SigningKey(key, key_id(key.public_key()))


def load_public_keys(path: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """kid -> public key, for every PEM ``PUBLIC KEY`` or ``CERTIFICATE`` block of the file (at least one).

    A private key in the file is refused: a verifier must not be able to sign.
    """
    data = _read(path, PUBLIC_KEYS_SETTING)
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for number, block in enumerate(_PEM_BLOCK.finditer(data), start=1):
        kind = block.group(1).decode()
        if "PRIVATE" in kind:
            raise ConfigurationError(
                f"{PUBLIC_KEYS_SETTING}: {path} holds a private key: verifiers get public keys only"
            )
        key: object = None
        try:
            if kind == "PUBLIC KEY":
                key = serialization.load_pem_public_key(block.group(0))
            elif kind == "CERTIFICATE":
                key = x509.load_pem_x509_certificate(block.group(0)).public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not _p256(key):
            raise ConfigurationError(
                f"{PUBLIC_KEYS_SETTING}: block {number} of {path} is not a P-256 (ES256) public key or certificate"
            )
        keys[key_id(key)] = key
    if not keys:
        raise ConfigurationError(f"{PUBLIC_KEYS_SETTING}: {path} holds no PEM public key")
    return keys


def agent_signing_key(settings: Settings) -> SigningKey | None:
    """The agent's private key, checked against the public keys it is given (required with it): a key the services
    do not hold would have every delegation refused (a rotation done in the wrong order)."""
    if settings.delegation_signing_key_file is None:
        return None
    key = load_signing_key(settings.delegation_signing_key_file)
    public = settings.delegation_public_keys_file
    if public is None:
        raise ConfigurationError(
            f"{SIGNING_KEY_SETTING} needs {PUBLIC_KEYS_SETTING}: the public keys the services verify delegations with"
        )
    if key.kid not in load_public_keys(public):
        raise ConfigurationError(
            f"{SIGNING_KEY_SETTING}: its public key (kid {key.kid}) is not in {PUBLIC_KEYS_SETTING}: the services "
            "would refuse its delegations (add the new public key everywhere first)"
        )
    return key


def refuse_signing_key(settings: Settings, who: str) -> None:
    """Only the agent signs delegations: any other process given the private key refuses to start."""
    if settings.delegation_signing_key_file is not None:
        raise ConfigurationError(
            f"{SIGNING_KEY_SETTING}: only the agent signs delegations; the {who} must not hold the private key "
            f"(it verifies with {PUBLIC_KEYS_SETTING})"
        )


def generate_key_pair(directory: Path) -> tuple[Path, Path]:
    """``altan up``: the development key pair in ``directory`` (created on first use, the private key mode 0600):
    (private key file, public key file). Processes starting together agree on one pair: the first to link wins."""
    private, public = directory / "delegation-signing-key.pem", directory / "delegation-public-keys.pem"
    if private.exists() and public.exists():
        return private, public
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not private.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _link_new(private, pem, 0o600)
        # The public key is derived from the private one, and rewritten when it is not (a private key replaced).
        pem = _public_pem(load_signing_key(private).key.public_key())
        if not public.exists() or public.read_bytes() != pem:
            tmp = public.with_name(f".{public.name}.{os.getpid()}.{secrets.token_hex(4)}")
            tmp.write_bytes(pem)
            tmp.replace(public)
    except OSError as exc:
        raise ConfigurationError(f"ALTAN_DATA_DIR: cannot write {directory}: {exc.strerror or exc}") from None
    return private, public


def _public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _link_new(path: Path, content: bytes, mode: int) -> None:
    """Write aside, then link into place (never a half-written file; an existing file is kept)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
