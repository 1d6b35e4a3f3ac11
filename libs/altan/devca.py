"""A throwaway certificate authority for ``altan up --tls`` and the tests: the mTLS path without cert-manager.

Each run makes a new CA (never kept across runs, never meant for production) and one certificate per service,
named as the services name each other: ``<service>.altan.local`` (what servers allow), with ``localhost`` and
``127.0.0.1`` (what clients dial locally). The files are what cert-manager writes into a Secret: ``tls.crt``,
``tls.key``, ``ca.crt``; keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevelopmentCa", "local_identity"]

_VALIDITY = datetime.timedelta(days=2)


def local_identity(service: str) -> str:
    """The name a local service's certificate carries, and that the services it may call allow."""
    return f"{service}.altan.local"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, none)


def _write(path: Path, data: bytes, mode: int) -> None:
    # Written aside and renamed into place: a process reloading the files never reads half of one.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class DevelopmentCa:
    """An ECDSA P-256 CA, valid two days, that issues client-and-server certificates."""

    def __init__(self, common_name: str = "altan development CA") -> None:
        self.key: ec.EllipticCurvePrivateKey = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @classmethod
    def load(cls, directory: Path) -> DevelopmentCa:
        """The CA that :meth:`write_ca` wrote into ``directory`` (tests issue more certificates with it)."""
        ca = cls.__new__(cls)
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        ca.key = key
        ca.certificate = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        return ca

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, identity: str, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) naming ``identity`` and ``hosts`` (DNS names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(identity)]
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def write_ca(self, directory: Path) -> Path:
        """The CA certificate as ``directory/ca.crt``, and its key as ``ca.key`` (0600, to issue more in tests)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(directory / "ca.key", _pem_key(self.key), 0o600)
        _write(directory / "ca.crt", self.pem, 0o644)
        return directory / "ca.crt"

    def write(self, directory: Path, identity: str, ca: bytes | None = None) -> tuple[Path, Path, Path]:
        """A certificate for ``identity`` as cert-manager lays it out: (tls.crt, tls.key, ca.crt) in ``directory``.

        The key goes first and the certificate last, so that a reader never pairs a new certificate with an old key.
        """
        cert, key = self.issue(identity)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(directory / "ca.crt", ca if ca is not None else self.pem, 0o644)
        _write(directory / "tls.key", key, 0o600)
        _write(directory / "tls.crt", cert, 0o644)
        return directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
