"""The one outbound HTTP client of the Tool Service, behind the egress guard.

:class:`GuardedHttpClient` asks the :class:`~altan.egress.EgressGuard` about every URL and then connects to exactly
the address that was checked, so a DNS answer cannot change between the check and the connection (DNS rebinding).
It follows redirects itself, re-checking every hop, and drops credentials when a hop changes origin. Each hop is a
client span (method, host, port, status: never the URL's path or query, which may carry a key); the trace context
goes to the third party only when the install says so (altan.telemetry.outbound_headers).
"""

from __future__ import annotations

import asyncio
import email.utils
import json as jsonlib
import ssl
import time
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import urljoin

import httpcore
import httpx
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

from altan import context, telemetry
from altan.egress import EgressGuard, HostBinding, ResolvedTarget
from altan.errors import EgressRefused, FailedPrecondition, InvalidArgument, Unavailable
from altan.metrics import EGRESS_REFUSED, count

__all__ = ["GuardedHttpClient", "GuardedTransport", "HttpResult", "StreamedResponse"]


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


# httpcore's pool looks at every one of its connections each time a request starts or ends, so its CPU per request
# grows with the connections it holds: at 500 model turns in flight it was 62 % of the integrator's CPU. Pools of at
# most this many connections, side by side, keep that scan short.
_SHARD_CONNECTIONS = 64


def _shard_sizes(max_connections: int) -> list[int]:
    """``max_connections`` split into pools of at most _SHARD_CONNECTIONS, as even as can be."""
    shards = -(-max_connections // _SHARD_CONNECTIONS)
    return [max_connections // shards + (1 if i < max_connections % shards else 0) for i in range(shards)]


class _ShardedPool:
    """Several connection pools as one: each request goes to the pool with the fewest requests in flight (the first
    of those, so that with little load one pool serves, and its kept-alive connections are reused)."""

    def __init__(self, pools: list[httpcore.AsyncConnectionPool]) -> None:
        self._pools = pools
        self._active = [0] * len(pools)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if len(self._pools) == 1:
            return await self._pools[0].handle_async_request(request)
        index = min(range(len(self._pools)), key=self._active.__getitem__)
        self._active[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._active[index] -= 1
            raise
        response.stream = _ReleasingStream(response.stream, self._active, index)
        return response

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()

    async def __aenter__(self) -> _ShardedPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _ReleasingStream:
    """A response body that gives its pool's place back once, when it is closed (its connection is free again)."""

    def __init__(self, inner: Any, active: list[int], index: int) -> None:
        self._inner, self._active, self._index = inner, active, index
        self._released = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._inner.__aiter__()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._released:
                self._released = True
                self._active[self._index] -= 1


class GuardedTransport(httpx.AsyncBaseTransport):
    """The egress guard for an ``httpx.AsyncClient`` that another library drives (the MCP SDK).

    Every request, whatever URL the library builds, is checked by the guard and connected to the checked address
    through the owner's pinned pool. A redirect is never followed: it is refused (the library cannot re-check where
    it leads). A body is not read past ``max_bytes``. Closing the transport leaves the shared pool open. The first
    egress refusal is kept in :attr:`refusal`, for the caller to report it whatever the library made of it.
    """

    def __init__(self, guard: EgressGuard, inner: httpx.AsyncBaseTransport, max_bytes: int) -> None:
        self._guard = guard
        self._inner = inner
        self._max_bytes = max_bytes
        self.refusal: EgressRefused | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            hop = await self._guard.check(str(request.url))
        except EgressRefused as exc:
            self.refusal = self.refusal or exc
            raise
        token = _PIN.set((hop.host, hop.port, hop.ip))
        try:
            with _client_span(request.method, hop) as current:
                telemetry.outbound_headers(request.headers)
                response = await self._inner.handle_async_request(request)
                _answered(current, response.status_code)
        finally:
            _PIN.reset(token)
        if response.status_code in _REDIRECTS:
            await response.aclose()
            count(EGRESS_REFUSED)
            self.refusal = self.refusal or EgressRefused(
                f"egress refused: {hop.target} answered a redirect, which is not followed here", target=hop.target
            )
            raise self.refusal
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            await response.aclose()
            raise FailedPrecondition(f"response from {hop.target} is larger than {self._max_bytes} bytes")
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _CappedStream(response.stream, self._max_bytes, hop.target)
        return response

    async def aclose(self) -> None:
        pass  # the pool belongs to the GuardedHttpClient


class _CappedStream(httpx.AsyncByteStream):
    """A response body that stops with an error past ``max_bytes`` (a streamed answer has no Content-Length)."""

    def __init__(self, inner: httpx.AsyncByteStream, max_bytes: int, target: str) -> None:
        self._inner = inner
        self._max_bytes = max_bytes
        self._target = target

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self._inner:
            size += len(chunk)
            if size > self._max_bytes:
                raise FailedPrecondition(f"response from {self._target} is larger than {self._max_bytes} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


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

    Holds one pooled ``httpx.AsyncClient`` for its whole life, of at most 100 connections (a call beyond waits for
    one); call :meth:`aclose` on shutdown.
    """

    def __init__(
        self,
        guard: EgressGuard,
        *,
        max_redirects: int = 5,
        max_response_bytes: int = 10 * 1024 * 1024,
        timeout: float = 30.0,
        verify: ssl.SSLContext | bool = True,
        max_connections: int = 100,
    ) -> None:
        self._guard = guard
        self._max_redirects = max_redirects
        self._max_bytes = max_response_bytes
        self._timeout = timeout
        # Every connection opened is kept for the next call (until idle for 5 s): with fewer kept than may be open,
        # each call beyond that many in flight opened a connection of its own, and over TLS a handshake.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        context = httpx.create_ssl_context(verify=verify, trust_env=False)  # ~40 ms: built once, used by both
        transport = httpx.AsyncHTTPTransport(verify=context, limits=limits, trust_env=False)
        # httpx 0.28 has no public hook for the network backend, so swap the (still empty) pool it built for one
        # that can only reach pinned addresses. If a future httpx renames this, the pinned-name tests fail.
        transport._pool = _ShardedPool(  # type: ignore[assignment]
            [
                httpcore.AsyncConnectionPool(
                    ssl_context=context,
                    max_connections=size,
                    max_keepalive_connections=size,
                    keepalive_expiry=limits.keepalive_expiry,
                    network_backend=_PinnedBackend(),
                )
                for size in _shard_sizes(max_connections)
            ]
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

    def transport(self) -> GuardedTransport:
        """An httpx transport, over this client's pinned pool, for an ``httpx.AsyncClient`` that a library builds
        (the MCP SDK's): see :class:`GuardedTransport`."""
        return GuardedTransport(self._guard, self._client._transport, self._max_bytes)

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
        bound_to: HostBinding | None = None,
    ) -> HttpResult:
        """Send a request, following redirects through the guard, and read the whole response.

        ``sensitive_headers`` names headers (a credential, say) that, like Authorization, Cookie and
        Proxy-Authorization, are dropped when a redirect leads to another host. ``timeout`` bounds the whole
        call: resolution, every hop and the body. ``bound_to``: the only hosts the sensitive headers may reach; a
        first hop elsewhere is refused, a redirect elsewhere loses them. Raises EgressRefused, Unavailable
        (unreachable or timed out) or FailedPrecondition (too many redirects, response too large).
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
                following = self._follow(method.upper(), url, hdrs, body, sensitive, bound_to, budget, state)
                async with following as (response, hop):
                    return await self._read(response, hop)
        except TimeoutError:
            raise Unavailable(f"could not reach {state['target']}: timed out after {budget:g}s") from None

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        json: Any = None,
        timeout: float | None = None,
        sensitive_headers: Collection[str] = (),
    ) -> AsyncIterator[StreamedResponse]:
        """Like :meth:`request`, but the body is read as it arrives (``async for line in response.lines()``).

        ``timeout`` bounds everything until the block ends, the reading included; the body is held to the same size
        limit as a whole response. For answers that come in pieces, such as Server-Sent Events from an LLM.
        """
        budget = self._timeout if timeout is None else timeout
        hdrs = {k: v for k, v in (headers or {}).items() if k.lower() != "host"}
        body = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            if not any(k.lower() == "content-type" for k in hdrs):
                hdrs["Content-Type"] = "application/json"
        sensitive = _ALWAYS_SENSITIVE | {h.lower() for h in sensitive_headers}
        state = {"target": "the destination"}
        try:
            async with asyncio.timeout(budget):
                following = self._follow(method.upper(), url, hdrs, body, sensitive, None, budget, state)
                async with following as (response, hop):
                    yield StreamedResponse(response, hop, self._max_bytes)
        except TimeoutError:
            raise Unavailable(f"could not reach {state['target']}: timed out after {budget:g}s") from None

    @asynccontextmanager
    async def _follow(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        sensitive: frozenset[str],
        bound_to: HostBinding | None,
        timeout: float,
        state: dict[str, str],
    ) -> AsyncIterator[tuple[httpx.Response, ResolvedTarget]]:
        """The first answer that is not a redirect, each hop checked by the guard; closed when the block ends."""
        previous: ResolvedTarget | None = None
        for _ in range(self._max_redirects + 1):
            hop = await self._guard.check(url)
            state["target"] = hop.target
            if bound_to is not None and not bound_to.allows(hop.scheme, hop.host, hop.port):
                if previous is None:
                    count(EGRESS_REFUSED)
                    raise EgressRefused(f"the credential may not be sent to {hop.target}", target=hop.target)
                headers = {k: v for k, v in headers.items() if k.lower() not in sensitive}
            # Credentials go to another host, or over plain http after https, only if the caller sends them there.
            if previous is not None and (
                (previous.host, previous.port) != (hop.host, hop.port)
                or (previous.scheme, hop.scheme) == ("https", "http")
            ):
                headers = {k: v for k, v in headers.items() if k.lower() not in sensitive}
            async with self._send(hop, method, headers, body, timeout) as response:
                location = response.headers.get("location")
                if response.status_code not in _REDIRECTS or not location:
                    yield response, hop
                    return
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
        try:
            request = self._client.build_request(method, hop.url, headers=headers, content=body, timeout=timeout)
        except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
            # Never quote the value: a header may hold a credential.
            raise InvalidArgument(f"the request to {hop.target} cannot be sent ({type(exc).__name__})") from None
        token = _PIN.set((hop.host, hop.port, hop.ip))
        with _client_span(method, hop) as current:
            telemetry.outbound_headers(request.headers)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TimeoutException:
                raise Unavailable(f"could not reach {hop.target}: timed out") from None
            except httpx.LocalProtocolError as exc:
                raise InvalidArgument(f"the request to {hop.target} cannot be sent ({type(exc).__name__})") from None
            except httpx.RemoteProtocolError as exc:
                # httpx reads a redirect's Location even when it does not follow it, and calls a malformed one a
                # protocol error: the answer is unusable, and asking again would get the same one.
                if str(exc).startswith("Invalid URL in location header"):
                    raise FailedPrecondition(f"{hop.target} answered a redirect to a malformed URL") from None
                raise Unavailable(f"could not reach {hop.target}: {_describe(exc)}") from None
            except httpx.TransportError as exc:
                raise Unavailable(f"could not reach {hop.target}: {_describe(exc)}") from None
            except (httpx.HTTPError, ValueError) as exc:  # e.g. a Location httpx itself cannot parse
                raise FailedPrecondition(f"{hop.target} answered something unusable ({type(exc).__name__})") from None
            finally:
                _PIN.reset(token)
            _answered(current, response.status_code)
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
            retry_after=_wait_asked(headers),
        )


@contextmanager
def _client_span(method: str, hop: ResolvedTarget) -> Iterator[Span]:
    """The span of one hop to a third party: where it went, never its path or query (they may hold a key)."""
    caller = context.current_or_none()
    attributes: dict[str, AttributeValue] = {
        "http.request.method": method,
        "server.address": hop.host,
        "server.port": hop.port,
    }
    if caller is not None:
        attributes[telemetry.TENANT] = caller.tenant_id
        if caller.task_id:
            attributes[telemetry.TASK] = caller.task_id
    with telemetry.span(method, telemetry.SpanKind.CLIENT, attributes) as current:
        try:
            yield current
        except BaseException as exc:
            telemetry.failed(current, type(exc).__name__)
            raise


def _answered(current: Span, status: int) -> None:
    telemetry.set_attributes(current, {"http.response.status_code": status})
    if status >= 500:
        telemetry.failed(current, str(status))


class StreamedResponse:
    """An answer being read: its status and headers now, its body line by line."""

    def __init__(self, response: httpx.Response, hop: ResolvedTarget, max_bytes: int) -> None:
        self._response = response
        self._max_bytes = max_bytes
        self.status = response.status_code
        self.headers = {k.lower(): v for k, v in response.headers.items()}
        self.target = hop.target
        self.retry_after = _parse_retry_after(self.headers.get("retry-after"))

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines (without their ends), decoded as UTF-8, within the size limit."""
        size = 0
        try:
            async for line in self._response.aiter_lines():
                size += len(line) + 1
                if size > self._max_bytes:
                    raise FailedPrecondition(f"response from {self.target} is larger than {self._max_bytes} bytes")
                yield line
        except httpx.TimeoutException:
            raise Unavailable(f"could not reach {self.target}: timed out reading the response") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise Unavailable(f"could not reach {self.target}: {_describe(exc)}") from None

    async def read(self) -> bytes:
        """The whole body, within the size limit."""
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in self._response.aiter_bytes():
                size += len(chunk)
                if size > self._max_bytes:
                    raise FailedPrecondition(f"response from {self.target} is larger than {self._max_bytes} bytes")
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise Unavailable(f"could not reach {self.target}: timed out reading the response") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise Unavailable(f"could not reach {self.target}: {_describe(exc)}") from None
        return b"".join(chunks)


def _describe(exc: Exception) -> str:
    """A short reason for a transport error. Only connection-level errors quote their text (from the OS or TLS);
    a protocol error's text can quote the request's headers, which may hold a credential."""
    if isinstance(exc, httpx.ConnectError | httpx.NetworkError) and not isinstance(exc, httpx.LocalProtocolError):
        return f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__
    return type(exc).__name__


def _wait_asked(headers: dict[str, str]) -> float | None:
    """How long the third party asks callers to wait: ``Retry-After``, else the reset of a rate limit it says is
    used up (``X-RateLimit-Remaining: 0`` with ``X-RateLimit-Reset`` in seconds or as a Unix time; the IETF draft's
    ``RateLimit-*`` alike); None when it asks nothing."""
    asked = _parse_retry_after(headers.get("retry-after"))
    if asked is not None:
        return asked
    for prefix in ("x-ratelimit-", "ratelimit-"):
        if headers.get(prefix + "remaining", "").strip() == "0":
            reset = headers.get(prefix + "reset", "").strip()
            if reset.isdigit():
                value = float(reset)
                return max(0.0, value - time.time()) if value > 1_000_000_000 else value
    return None


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
