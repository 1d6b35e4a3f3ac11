"""Listening addresses: bound exclusively, and one clear line for the operator when one cannot be bound.

Two servers must never share a port. grpc sets ``SO_REUSEPORT`` by default, which lets a second stack started on
the same ports bind them too and silently take half of the connections; every listener of ours binds without it
(``SO_REUSEADDR`` alone only lets a restarted server bind next to connections of its predecessor that linger in
TIME_WAIT, never next to a live listener).
"""

from __future__ import annotations

import os
import socket

__all__ = ["CannotListen", "bind_problem", "join_address", "listen_socket", "split_address"]

_BACKLOG = 2048


class CannotListen(Exception):
    """A server cannot bind its address; ``line`` is what the operator reads (no traceback)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason

    def line(self, who: str, setting: str) -> str:
        """E.g. ``the agent service cannot listen on 127.0.0.1:50061: address already in use (ALTAN_AGENT_PORT)``."""
        return f"the {who} cannot listen on {self.address}: {self.reason} ({setting})"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its host and port."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def join_address(host: str, port: int) -> str:
    """The address as grpc and people write it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _bound_socket(host: str, port: int) -> socket.socket:
    address = join_address(host, port)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListen(address, f"unknown host ({exc.strerror})") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise CannotListen(address, _reason(exc)) from None
    return sock


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound exclusively; raises :class:`CannotListen`."""
    sock = _bound_socket(host, port)
    try:
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise CannotListen(join_address(host, port), _reason(exc)) from None
    sock.setblocking(False)
    return sock


def bind_problem(host: str, port: int) -> str | None:
    """Why a server cannot listen on ``host:port`` right now (``address already in use``...), or None if it can.

    Binds without listening, so no connection is ever accepted by the probe. For servers that bind by themselves
    (grpc, which only logs why it failed) and for ``altan up`` before it starts anything.
    """
    try:
        _bound_socket(host, port).close()
    except CannotListen as exc:
        return exc.reason
    return None
