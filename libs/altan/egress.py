"""The egress guard and the one outbound HTTP client of the Tool Service.

Tools reach only public addresses. :class:`EgressGuard` judges a URL: it parses the host the way a browser or
``inet_aton`` would (so ``0x7f000001``, ``0177.0.0.1``, ``127.1`` and ``[::ffff:7f00:1]`` are all seen as
127.0.0.1), resolves a name once, and refuses when any address is not globally reachable, unless
``ALTAN_EGRESS_ALLOW`` exempts it. :class:`GuardedHttpClient` then connects to exactly the address that was
checked, so a DNS answer cannot change between the check and the connection (DNS rebinding), and it re-checks
every redirect hop itself.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json as jsonlib
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
import idna

from altan.errors import EgressRefused, FailedPrecondition, Unavailable

__all__ = ["EgressGuard", "EgressPolicy", "GuardedHttpClient", "HostPort", "HttpResult", "ResolvedTarget"]

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
        target = _authority(host, port)
        path_and_query = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
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


# The (host, port, ip) the guard checked for the request this task is sending; read by the network backend.
_PIN: ContextVar[tuple[str, int, str] | None] = ContextVar("altan_egress_pin", default=None)


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to the address pinned for the current request, never resolving a name.

    The URL keeps the real host name, so httpcore pools connections per name and TLS verifies the certificate
    for that name; rewriting the URL to the IP instead would let a connection verified for one name be reused
    for another name that resolves to the same address.
    """

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pin = _PIN.get()
        if pin is None or pin[:2] != (host, port):
            raise httpcore.ConnectError("no checked address for this connection")  # fail closed
        return await self._inner.connect_tcp(pin[2], port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not an egress destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@dataclass(frozen=True)
class HttpResult:
    """A fully read response."""

    status: int
    headers: dict[str, str]  # lowercase names; repeated headers joined with ", "
    body: bytes
    target: str  # "host:port" of the final hop
    retry_after: float | None  # seconds, from Retry-After (delta-seconds or HTTP-date) when present


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ALWAYS_SENSITIVE = frozenset({"authorization", "cookie", "proxy-authorization"})
_BODY_HEADERS = frozenset({"content-type", "content-length", "transfer-encoding", "content-encoding"})


class GuardedHttpClient:
    """The Tool Service's only way out: every hop is checked by the guard and connected to its checked address.

    Holds one pooled ``httpx.AsyncClient`` for its whole life; call :meth:`aclose` on shutdown.
    """

    def __init__(
        self,
        guard: EgressGuard,
        *,
        max_redirects: int = 5,
        max_response_bytes: int = 10 * 1024 * 1024,
        timeout: float = 30.0,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._guard = guard
        self._max_redirects = max_redirects
        self._max_bytes = max_response_bytes
        self._timeout = timeout
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
        transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        # httpx 0.28 has no public hook for the network backend, so swap the (still empty) pool it built for one
        # that can only reach pinned addresses. If a future httpx renames this, the pinned-name tests fail.
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedBackend(),
        )
        self._client = httpx.AsyncClient(
            transport=transport,
            trust_env=False,  # proxies from the environment would bypass the pinned address
            follow_redirects=False,  # each hop must pass the guard first
            timeout=timeout,
            # One client serves every tenant: a cookie set for one call must never be replayed on another.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        timeout: float | None = None,
        sensitive_headers: Collection[str] = (),
    ) -> HttpResult:
        """Send a request, following redirects through the guard, and read the whole response.

        ``sensitive_headers`` names headers (a credential, say) that, like Authorization, Cookie and
        Proxy-Authorization, are dropped when a redirect leads to another host. ``timeout`` bounds the whole
        call: resolution, every hop and the body. Raises EgressRefused, Unavailable (unreachable or timed out)
        or FailedPrecondition (too many redirects, response too large).
        """
        if json is not None and content is not None:
            raise ValueError("pass json or content, not both")
        budget = self._timeout if timeout is None else timeout
        hdrs = {k: v for k, v in (headers or {}).items() if k.lower() != "host"}  # Host comes from the URL
        body = content
        if json is not None:
            body = jsonlib.dumps(json).encode()
            if not any(k.lower() == "content-type" for k in hdrs):
                hdrs["Content-Type"] = "application/json"
        if params:
            query = str(httpx.QueryParams(params))
            base = url.partition("#")[0]
            url = f"{base}{'&' if '?' in base else '?'}{query}"
        sensitive = _ALWAYS_SENSITIVE | {h.lower() for h in sensitive_headers}
        state = {"target": "the destination"}  # for the timeout message
        try:
            async with asyncio.timeout(budget):
                return await self._follow(method.upper(), url, hdrs, body, sensitive, budget, state)
        except TimeoutError:
            raise Unavailable(f"could not reach {state['target']}: timed out after {budget:g}s") from None

    async def _follow(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        sensitive: frozenset[str],
        timeout: float,
        state: dict[str, str],
    ) -> HttpResult:
        previous: ResolvedTarget | None = None
        for _ in range(self._max_redirects + 1):
            hop = await self._guard.check(url)
            state["target"] = hop.target
            # Credentials go to another host, or over plain http after https, only if the caller sends them there.
            if previous is not None and (
                (previous.host, previous.port) != (hop.host, hop.port)
                or (previous.scheme, hop.scheme) == ("https", "http")
            ):
                headers = {k: v for k, v in headers.items() if k.lower() not in sensitive}
            async with self._send(hop, method, headers, body, timeout) as response:
                location = response.headers.get("location")
                if response.status_code not in _REDIRECTS or not location:
                    return await self._read(response, hop)
            # 303 always, and 301/302 after POST, become a body-less GET, as browsers do.
            if (response.status_code == 303 and method != "HEAD") or (
                response.status_code in (301, 302) and method == "POST"
            ):
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() not in _BODY_HEADERS}
            url, previous = urljoin(url, location), hop
        raise FailedPrecondition(f"too many redirects (more than {self._max_redirects})")

    @asynccontextmanager
    async def _send(
        self, hop: ResolvedTarget, method: str, headers: dict[str, str], body: bytes | None, timeout: float
    ) -> AsyncIterator[httpx.Response]:
        request = self._client.build_request(method, hop.url, headers=headers, content=body, timeout=timeout)
        token = _PIN.set((hop.host, hop.port, hop.ip))
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise Unavailable(f"could not reach {hop.target}: timed out") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"could not reach {hop.target}: {_describe(exc)}") from None
        finally:
            _PIN.reset(token)
        try:
            yield response
        finally:
            await response.aclose()

    async def _read(self, response: httpx.Response, hop: ResolvedTarget) -> HttpResult:
        too_large = FailedPrecondition(f"response from {hop.target} is larger than {self._max_bytes} bytes")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        try:
            # Decoded bytes are counted, so a compressed body cannot expand past the limit.
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self._max_bytes:
                    raise too_large
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise Unavailable(f"could not reach {hop.target}: timed out reading the response") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise Unavailable(f"could not reach {hop.target}: {_describe(exc)}") from None
        headers = {k.lower(): v for k, v in response.headers.items()}
        return HttpResult(
            status=response.status_code,
            headers=headers,
            body=b"".join(chunks),
            target=hop.target,
            retry_after=_parse_retry_after(headers.get("retry-after")),
        )


def _describe(exc: Exception) -> str:
    """A short reason for a transport error; these come from the OS or TLS, never from the request."""
    return f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date), or None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
