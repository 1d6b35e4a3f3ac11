"""Mutual TLS between the services: certificate files that rotate without a restart, and who may call whom.

With ``ALTAN_TLS_CERT_FILE``, ``ALTAN_TLS_KEY_FILE`` and ``ALTAN_TLS_CA_FILE`` set, every internal gRPC port (agent,
tool, integrator) speaks TLS and requires a client certificate signed by that CA, and every internal client presents
the process's own certificate. Each server then admits only the callers named in ``ALTAN_TLS_ALLOWED_CLIENTS`` (the
identities, DNS or URI subject alternative names, of the services its NetworkPolicy lets in), so that a stolen
network position is not enough: a caller needs a certificate, and the right one.

Rotation: cert-manager (or ``altan up --tls``) rewrites the files in place. A server reads them again before the
handshake of each new connection once they changed (grpc's certificate configuration fetcher); a client opens a new
channel with the new files for the calls that follow the change, and lets the calls already under way finish on the
old one. Nothing restarts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from altan.config import ConfigurationError, Settings
from altan.errors import PermissionDenied

__all__ = ["PeerAllowList", "ReloadingChannel", "TlsFiles", "secure_channel", "server_credentials", "tls_files"]

log = logging.getLogger(__name__)

# A client looks at its files at most this often (one stat per file): a rotation is picked up within a second.
_CLIENT_CHECK_SECONDS = 1.0
# A retired channel keeps serving the calls and streams that started on it (an event stream lasts up to an hour).
_RETIRED_CHANNEL_SECONDS = 3600.0


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one process: its certificate (chain), its private key, and the CA that signs its peers."""

    cert: Path
    key: Path
    ca: Path

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """Changes whenever a file is replaced or rewritten (Kubernetes swaps a symlink; ``altan up`` renames)."""
        stamps = []
        for path in (self.cert, self.key, self.ca):
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain, key, CA); ValueError when the key is not the certificate's (a rotation half written:
        the caller keeps what it has and reads again later)."""
        cert, key, ca = self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        if not _key_matches(cert, key):
            raise ValueError(f"{self.key} is not the key of {self.cert}")
        return cert, key, ca


def _unreadable(exc: OSError) -> ConfigurationError:
    reason = f"cannot read {exc.filename}: {exc.strerror}"
    return ConfigurationError(f"ALTAN_TLS_CERT_FILE, ALTAN_TLS_KEY_FILE, ALTAN_TLS_CA_FILE: {reason}")


def _first_stamp(files: TlsFiles) -> tuple[tuple[int, int, int], ...]:
    try:
        return files.stamp()
    except OSError as exc:
        raise _unreadable(exc) from None


def _first_read(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    """The files at start-up: unreadable or mismatched, the process stops with one line naming the settings."""
    for _ in range(20):  # a rotation under way at start-up settles within a second
        try:
            return files.read()
        except ValueError:
            time.sleep(0.05)
        except OSError as exc:
            raise _unreadable(exc) from None
    raise ConfigurationError(f"ALTAN_TLS_KEY_FILE: {files.key} is not the key of {files.cert}")


def tls_files(settings: Settings) -> TlsFiles | None:
    """This process's certificate files, when mTLS is configured (Settings checks that all three are there)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None or settings.tls_ca_file is None:
        return None
    return TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)


def _key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    try:
        public = x509.load_pem_x509_certificate(cert_pem).public_key()
        private = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    return bool(public.public_bytes(pem, raw) == private.public_key().public_bytes(pem, raw))


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS that requires a client certificate from the CA, re-read from the files when they change."""
    loaded = [_first_stamp(files)]  # before reading: a change in between is seen at the next connection
    cert, key, ca = _first_read(files)

    def configuration(cert: bytes, key: bytes, ca: bytes) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc before the handshake of every new connection: a stat of three files when nothing changed.
        try:
            stamp = files.stamp()
            if stamp == loaded[0]:
                return None
            fresh = configuration(*files.read())
        except (OSError, ValueError) as exc:  # keep serving with what was loaded; try again on the next connection
            log.warning("TLS files not reloaded", extra={"reason": str(exc)})
            return None
        loaded[0] = stamp
        log.info("TLS certificate reloaded", extra={"cert": str(files.cert)})
        return fresh

    fetcher: Any = fetch  # grpc documents None as "no change"; its type stubs do not say so
    initial = configuration(cert, key, ca)
    return grpc.dynamic_ssl_server_credentials(initial, fetcher, require_client_authentication=True)


class PeerAllowList:
    """Which client identities may call a server: any subject alternative name of the peer's certificate.

    The TLS handshake has already proven the certificate (signed by the CA, not expired); this says whether that
    service may call this one, as the NetworkPolicies say it at the network layer.
    """

    def __init__(self, identities: Sequence[str]) -> None:
        self._allowed = frozenset(i.encode() for i in identities)

    def check(self, context: Any) -> None:
        """Raises :class:`PermissionDenied` unless the caller's certificate names an allowed identity."""
        names = context.auth_context().get("x509_subject_alternative_name", ())
        if self._allowed.isdisjoint(names):
            raise PermissionDenied("this service does not accept calls from the caller's certificate")


def _channel_credentials(files: TlsFiles, *, first: bool = False) -> grpc.ChannelCredentials:
    cert, key, ca = _first_read(files) if first else files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class _Multicallable:
    """A stub's method that calls through the channel of the current certificate (one lookup per call)."""

    __slots__ = ("_args", "_cache", "_kind", "_owner")

    def __init__(self, owner: ReloadingChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._kind = kind
        self._args = (args, kwargs)
        self._cache: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if self._cache is None or self._cache[0] is not channel:
            positional, named = self._args
            self._cache = (channel, getattr(channel, self._kind)(*positional, **named))
        return self._cache[1](*args, **kwargs)


class ReloadingChannel:
    """A TLS channel that follows its certificate files: the typed stubs are built on it as on a grpc channel, and
    each call goes through a channel made with the files as they are now (a new one after a rotation)."""

    def __init__(
        self,
        target: str,
        files: TlsFiles,
        options: Sequence[tuple[str, Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._files = files
        self._options = tuple(options)
        self._clock = clock
        self._stamp = _first_stamp(files)  # before reading: a change in between is seen at the next look
        self._channel = grpc.aio.secure_channel(target, _channel_credentials(files, first=True), options=self._options)
        self._checked = clock()
        self._retired: list[tuple[float, grpc.aio.Channel]] = []
        self._closing: set[asyncio.Task[None]] = set()

    def current(self) -> grpc.aio.Channel:
        now = self._clock()
        if now - self._checked >= _CLIENT_CHECK_SECONDS:
            self._checked = now
            self._follow_rotation(now)
        return self._channel

    def _follow_rotation(self, now: float) -> None:
        try:
            stamp = self._files.stamp()
            if stamp == self._stamp:
                return
            credentials = _channel_credentials(self._files)
        except (OSError, ValueError) as exc:  # keep the channel we have; look again in a second
            log.warning("TLS files not reloaded", extra={"reason": str(exc)})
            return
        self._stamp = stamp
        self._retired.append((now, self._channel))
        self._channel = grpc.aio.secure_channel(self._target, credentials, options=self._options)
        log.info("TLS client certificate reloaded", extra={"target": self._target})
        for retired_at, old in [r for r in self._retired if now - r[0] > _RETIRED_CHANNEL_SECONDS]:
            self._retired.remove((retired_at, old))
            closing = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Multicallable(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Multicallable(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Multicallable(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Multicallable(self, "stream_stream", args, kwargs)

    async def close(self, grace: float | None = None) -> None:
        channels = [self._channel, *(old for _, old in self._retired)]
        self._retired.clear()
        await asyncio.gather(*(c.close(grace) for c in channels))


def secure_channel(target: str, files: TlsFiles, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to ``target`` with this process's certificate, following its rotations (a grpc channel to stubs)."""
    channel: Any = ReloadingChannel(target, files, options)
    return channel  # type: ignore[no-any-return]
