"""The egress guard: which destinations tools may reach.

Tools reach only public addresses. :class:`EgressGuard` judges a URL: it parses the host the way a browser or
``inet_aton`` would (so ``0x7f000001``, ``0177.0.0.1``, ``127.1`` and ``[::ffff:7f00:1]`` are all seen as
127.0.0.1), resolves a name once, and refuses when any address is not globally reachable, unless
``ALTAN_EGRESS_ALLOW`` exempts it. :class:`altan.outbound.GuardedHttpClient` then connects to exactly the
address that was checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import idna

from altan.errors import EgressRefused, FailedPrecondition, Unavailable
from altan.metrics import EGRESS_REFUSED, count

__all__ = ["EgressGuard", "EgressPolicy", "HostBinding", "HostPort", "ResolvedTarget", "destination"]

# getaddrinfo's "no such name" answers (NXDOMAIN, or a name without addresses); anything else may pass.
_NO_SUCH_NAME = frozenset(
    code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None)) if code is not None
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``resolver(host, port)`` returns ``getaddrinfo``-shaped tuples; a parameter so tests can stand in for DNS.
Resolver = Callable[[str, int], Awaitable[Sequence[tuple[Any, ...]]]]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")

# Checked in order, so the first match names the most specific rule in the refusal message; ranges the stdlib
# already calls non-global (documentation, benchmarking, ...) fall through to the `is_global` check below.
_V4_RULES = [
    (ipaddress.ip_network(net), why)
    for net, why in [
        ("0.0.0.0/32", "an unspecified address"),
        ("0.0.0.0/8", "a 'this network' address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),  # includes cloud metadata, 169.254.169.254
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("100.64.0.0/10", "a shared (CGNAT) address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "a broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
        ("192.0.0.0/24", "a reserved (IETF protocol) address"),
        ("192.88.99.0/24", "a reserved (6to4 relay) address"),
    ]
]
_V6_RULES = [
    (ipaddress.ip_network(net), why)
    for net, why in [
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("fe80::/10", "a link-local address"),
        ("fc00::/7", "a private (unique local) address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("3fff::/20", "a documentation address"),  # RFC 9637 (2024), newer than the stdlib's table
    ]
]
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a translation prefix carries, since packets to it end up there."""
    if ip in _NAT64 or ip in _V4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return ip.teredo[1] if ip.teredo is not None else None


def _why_forbidden(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public destination (a phrase such as "is a loopback address"), or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        inner = _why_forbidden(ip.ipv4_mapped)
        return f"maps to {ip.ipv4_mapped}, which {inner}" if inner else None
    for net, why in _V4_RULES if ip.version == 4 else _V6_RULES:
        if ip in net:
            return f"is {why}"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_v4(ip)
        if embedded is not None and (inner := _why_forbidden(embedded)):
            return f"embeds {embedded}, which {inner}"
        if ip in _NAT64:
            return None  # NAT64 of a public IPv4 address is as public as that address
        if ip not in _GLOBAL_UNICAST:
            return "is not a global unicast address"
    # The stdlib's view catches ranges registered after this table was written.
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return "is a non-global address"
    return None


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Parse every IPv4 spelling ``inet_aton`` accepts (1-4 parts, decimal, 0-octal, 0x-hex), else None.

    Raises ValueError when the host ends in a number but is no valid address: browsers refuse those too, and
    letting the resolver guess would judge a name the OS might read differently.
    """
    parts = host.split(".")
    if not _NUMERIC_LABEL.match(parts[-1]):
        return None
    if len(parts) > 4 or not all(_NUMERIC_LABEL.match(p) for p in parts):
        raise ValueError("not a valid IPv4 address")
    values = []
    for part in parts:
        if part.startswith("0x"):
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            values.append(int(part, 8))  # raises ValueError on 8 or 9, as inet_aton refuses them
        else:
            values.append(int(part))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise ValueError("not a valid IPv4 address")
    number = last
    for i, v in enumerate(head):
        number |= v << (24 - 8 * i)
    return ipaddress.IPv4Address(number)


def _normalize_host(host: str) -> tuple[str, IPAddress | None]:
    """Canonical form of a URL host (no brackets): (lowercase ASCII name or IP text, the IP if a literal).

    Raises ValueError for anything that is neither a valid name nor an address.
    """
    host = host.lower()
    if ":" in host:
        if "%" in host:
            raise ValueError("IPv6 zone identifiers are not allowed")
        ip6 = ipaddress.IPv6Address(host)
        return str(ip6), ip6
    host = host.removesuffix(".")  # "localhost." and "127.0.0.1." are the same host to a resolver
    if not host.isascii():
        host = idna.encode(host, uts46=True).decode("ascii")
    ip4 = _parse_ipv4(host) if host else None
    if ip4 is not None:
        return str(ip4), ip4
    if not host or len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        raise ValueError("not a valid host name")
    return host, None


def _unmapped(ip: IPAddress) -> IPAddress:
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None else ip


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(url: str) -> tuple[str, str, IPAddress | None, int, str]:
    """``(scheme, normalized host, its IP if a literal, port, path and query)`` of a URL; EgressRefused if unusable.

    The one reading of a URL's destination, for the guard and for a credential's hosts alike.
    """
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        raw_host, port = parts.hostname, parts.port
    except ValueError:
        raise EgressRefused("egress refused: the URL is malformed") from None
    if scheme not in _DEFAULT_PORTS:
        raise EgressRefused(f"egress refused: scheme {scheme[:16]!r} is not allowed (use http or https)")
    port = _DEFAULT_PORTS[scheme] if port is None else port
    if not raw_host or port == 0:
        raise EgressRefused("egress refused: the URL has no host or port")
    try:
        host, literal = _normalize_host(raw_host)
    except ValueError:
        raise EgressRefused(f"egress refused: {raw_host[:64]!r} is not a valid host") from None
    return scheme, host, literal, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def destination(url: str) -> str:
    """``host:port`` of a URL as the guard reads it (and as the audit names it), or "" when it cannot be read."""
    try:
        _, host, _, port, _ = _split(url)
    except EgressRefused:
        return ""
    return _authority(host, port)


@dataclass(frozen=True)
class HostBinding:
    """Where a credential may be sent: its ``hosts``, each ``host`` or ``host:port`` (``[IPv6]:port``).

    Hosts compare in the guard's canonical form, so every spelling of one host (case, a trailing dot, IDNA,
    ``0x7f000001`` for ``127.0.0.1``, IPv4-mapped IPv6) is that host, and no other name is, even one that resolves
    to the same address. An entry without a port allows https on 443 only: a secret never crosses the network in
    the clear unless an admin names the port.
    """

    entries: frozenset[tuple[str, int | None]]

    @classmethod
    def parse(cls, hosts: Iterable[str]) -> HostBinding:
        """ValueError names the first entry that is not a host."""
        entries: set[tuple[str, int | None]] = set()
        for raw in hosts:
            host, port = raw, None
            head, sep, tail = raw.rpartition(":")
            if sep and tail.isdigit() and (head.endswith("]") or ":" not in head):
                host, port = head, int(tail)
                if not 0 < port < 65536:
                    raise ValueError(f"{raw!r}: the port must be in 1-65535")
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            elif ":" in host:
                raise ValueError(f"{raw!r}: write an IPv6 address in brackets, as [2001:db8::1]:8443")
            try:
                entries.add((_unmapped_text(_normalize_host(host)), port))
            except (ValueError, UnicodeError):
                raise ValueError(f"{raw!r} is not a host name or an IP address") from None
        return cls(frozenset(entries))

    def allows(self, scheme: str, host: str, port: int) -> bool:
        """True when an entry names this normalized host and port (no port: https on 443)."""
        host = _unmapped_text((host, _ip_or_none(host)))
        if (host, port) in self.entries:
            return True
        return scheme == "https" and port == 443 and (host, None) in self.entries

    def allows_url(self, url: str) -> bool:
        """The same, for a URL read as the guard reads it; False for a URL the guard would refuse to read."""
        try:
            scheme, host, _, port, _ = _split(url)
        except EgressRefused:
            return False
        return self.allows(scheme, host, port)


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _unmapped_text(normalized: tuple[str, IPAddress | None]) -> str:
    host, ip = normalized
    return host if ip is None else str(_unmapped(ip))


@dataclass(frozen=True)
class HostPort:
    """An ``ALTAN_EGRESS_ALLOW`` entry naming one destination: a normalized host (name or IP) and a port."""

    host: str
    port: int


@dataclass(frozen=True)
class EgressPolicy:
    """Destinations exempt from the public-address rule (``ALTAN_EGRESS_ALLOW``); scheme rules still apply."""

    allow: tuple[HostPort | IPNetwork, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> EgressPolicy:
        """Parse comma-separated ``host:port`` (``[IPv6]:port`` for IPv6) and CIDR entries; ValueError if bad."""
        entries: list[HostPort | IPNetwork] = []
        for raw in (item.strip() for item in spec.split(",")):
            if not raw:
                continue
            try:
                entries.append(cls._parse_entry(raw))
            except ValueError as exc:
                raise ValueError(f"bad ALTAN_EGRESS_ALLOW entry {raw!r}: {exc}") from None
        return cls(tuple(entries))

    @staticmethod
    def _parse_entry(raw: str) -> HostPort | IPNetwork:
        if "/" in raw:
            return ipaddress.ip_network(raw, strict=False)
        host, sep, port_text = raw.rpartition(":")
        if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError("expected host:port with a port in 1-65535, or a CIDR")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host or not host:
            raise ValueError("write an IPv6 address in brackets, as [::1]:8080")
        return HostPort(_normalize_host(host)[0], int(port_text))

    def exempts(self, host: str, ip: IPAddress | None, port: int) -> bool:
        """True when an entry names this host (as given, or its IP) and port, or a CIDR holds the IP."""
        for entry in self.allow:
            if isinstance(entry, HostPort):
                if entry.port == port and entry.host in (host, str(ip)):
                    return True
            elif ip is not None and entry.version == ip.version and ip in entry:
                return True
        return False


@dataclass(frozen=True)
class ResolvedTarget:
    """A destination that passed the guard; connect to ``ip`` and nowhere else."""

    scheme: str
    host: str  # normalized host as given (a name, or the canonical IP text for a literal); Host and SNI use it
    port: int
    ip: str  # the address that was checked and must be connected to
    path_and_query: str
    target: str  # "host:port", for audit and error messages

    @property
    def url(self) -> str:
        """The request URL, normalized and without userinfo or fragment."""
        return f"{self.scheme}://{_authority(self.host, self.port)}{self.path_and_query}"


class EgressGuard:
    """Decides whether a URL may be fetched, and pins the address to connect to."""

    def __init__(self, policy: EgressPolicy, resolve_timeout: float = 5.0, *, resolver: Resolver | None = None) -> None:
        self._policy = policy
        self._resolve_timeout = resolve_timeout
        self._resolver = resolver or _getaddrinfo

    async def check(self, url: str) -> ResolvedTarget:
        """Return the pinned target for ``url``, or raise EgressRefused (Unavailable if the name won't resolve)."""
        try:
            return await self._check(url)
        except EgressRefused:
            count(EGRESS_REFUSED)
            raise

    async def _check(self, url: str) -> ResolvedTarget:
        scheme, host, literal, port, path_and_query = _split(url)
        target = _authority(host, port)
        if literal is not None:
            ips: list[IPAddress] = [literal]
        else:
            is_localhost = host == "localhost" or host.endswith(".localhost")
            if is_localhost and not self._policy.exempts(host, None, port):
                # RFC 6761: these names are loopback whatever DNS says, so refuse them without asking it.
                raise EgressRefused(f"egress refused: {host} is a loopback name", target=target)
            ips = await self._resolve(host, port, target)
        for ip in ips:
            if self._policy.exempts(host, _unmapped(ip), port):
                continue
            why = _why_forbidden(ip)
            if why is not None:
                subject = host if literal is not None else f"{host} resolves to {ip}, which"
                raise EgressRefused(f"egress refused: {subject} {why}", target=target)
        # An IPv4-mapped address is reached over IPv4, which works whether or not the host has IPv6.
        return ResolvedTarget(scheme, host, port, str(_unmapped(ips[0])), path_and_query, target)

    async def _resolve(self, host: str, port: int, target: str) -> list[IPAddress]:
        try:
            async with asyncio.timeout(self._resolve_timeout):
                infos = await self._resolver(host, port)
        except TimeoutError:
            raise Unavailable(f"could not resolve {target}: timed out") from None
        except socket.gaierror as exc:
            reason = exc.strerror or type(exc).__name__
            if exc.errno in _NO_SUCH_NAME:
                # The DNS answered that the name does not exist: retrying will not help, the destination is wrong.
                raise FailedPrecondition(f"could not resolve {target}: {reason}") from None
            raise Unavailable(f"could not resolve {target}: {reason}") from None
        except OSError as exc:
            raise Unavailable(f"could not resolve {target}: {exc.strerror or type(exc).__name__}") from None
        ips: list[IPAddress] = []
        for family, *_, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
                if ip not in ips:
                    ips.append(ip)
        if not ips:
            raise Unavailable(f"could not resolve {target}: no addresses")
        return ips


async def _getaddrinfo(host: str, port: int) -> Sequence[tuple[Any, ...]]:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
