"""Tests for altan.egress: the guard judges every spelling of a forbidden address, and the client connects only to
what it checked. Third parties are real HTTP(S) servers on 127.0.0.1; DNS is faked where a name must resolve to a
chosen address. No test connects anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from altan import outbound
from altan.egress import EgressGuard, EgressPolicy, HostBinding, HostPort
from altan.errors import EgressRefused, FailedPrecondition, Unavailable
from altan.outbound import GuardedHttpClient

Reply = tuple[int, dict[str, str], bytes]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeApi:
    """A third-party HTTP/1.1 server on 127.0.0.1 (keep-alive, optional TLS) that records every request."""

    routes: dict[str, Reply | str] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def origin(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def received(self, path: str, count: int) -> None:
        """Until ``count`` requests for ``path`` have arrived."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len([s for s in self.seen if s.path == path]) >= count)

    async def start(self) -> FakeApi:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        # Closing the connections (rather than cancelling handlers) lets every handler finish on its own.
        self._closing.set()
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (raw := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = raw.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append(Seen(method, path, headers, body))
                async with self._arrived:
                    self._arrived.notify_all()
                reply = self.routes.get(path.partition("?")[0], (404, {}, b"no such route"))
                if reply == "hang":
                    await self._closing.wait()
                    break
                if reply == "stream":  # no Content-Length: the body runs until the connection closes
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 100_000)
                    break
                assert isinstance(reply, tuple)
                status, extra, payload = reply
                head = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                writer.write(f"HTTP/1.1 {status} X\r\n{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to record
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[FakeApi]]]:
    started: list[FakeApi] = []

    async def start(routes: dict[str, Reply | str] | None = None, tls: ssl.SSLContext | None = None) -> FakeApi:
        api = await FakeApi(routes or {}, tls).start()
        started.append(api)
        return api

    yield start
    for api in started:
        await api.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., GuardedHttpClient]]:
    made: list[GuardedHttpClient] = []

    def make(policy: str = "", *, resolver: Any = None, **kwargs: Any) -> GuardedHttpClient:
        client = GuardedHttpClient(EgressGuard(EgressPolicy.parse(policy), resolver=resolver), **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


def fake_dns(table: dict[str, list[str]], calls: list[str]) -> Callable[[str, int], Awaitable[Sequence[Any]]]:
    """A resolver standing in for DNS: answers from ``table`` and records each lookup."""

    async def resolve(host: str, port: int) -> Sequence[Any]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in table[host]
        ]

    return resolve


async def no_dns(host: str, port: int) -> Sequence[Any]:
    raise AssertionError(f"a literal address must be judged without DNS, but {host} was resolved")


TEREDO_LOOPBACK = "2001:0:4136:e378:8000:63bf:80ff:fffe"  # Teredo client 127.0.0.1 (bits inverted)


@pytest.mark.parametrize(
    ("url", "reason", "target"),
    [
        ("http://127.0.0.1/", "127.0.0.1 is a loopback address", "127.0.0.1:80"),
        ("https://127.0.0.1:8443/x", "loopback", "127.0.0.1:8443"),
        ("http://[::1]/", "::1 is a loopback address", "[::1]:80"),
        ("http://[::ffff:127.0.0.1]/", "maps to 127.0.0.1, which is a loopback address", "[::ffff:7f00:1]:80"),
        ("http://[::ffff:7f00:1]/", "maps to 127.0.0.1", "[::ffff:7f00:1]:80"),
        ("http://[64:ff9b::7f00:1]/", "embeds 127.0.0.1, which is a loopback address", None),
        ("http://[64:ff9b::a9fe:a9fe]/", "embeds 169.254.169.254, which is a link-local address", None),
        ("http://[2002:7f00:1::]/", "embeds 127.0.0.1", None),
        (f"http://[{TEREDO_LOOPBACK}]/", "embeds 127.0.0.1", None),
        ("http://[::127.0.0.1]/", "embeds 127.0.0.1", None),
        ("http://2130706433/", "127.0.0.1 is a loopback address", "127.0.0.1:80"),
        ("http://017700000001/", "127.0.0.1 is a loopback", None),
        ("http://0177.0.0.1/", "127.0.0.1 is a loopback", None),
        ("http://0x7f000001/", "127.0.0.1 is a loopback", None),
        ("http://0x7f.0.0.1/", "127.0.0.1 is a loopback", None),
        ("http://0X7F.0.0.1/", "127.0.0.1 is a loopback", None),
        ("http://127.1/", "127.0.0.1 is a loopback", None),
        ("http://127.0.0.1./", "127.0.0.1 is a loopback", "127.0.0.1:80"),
        ("http://user@127.0.0.1/", "loopback", "127.0.0.1:80"),
        ("http://public.example@127.0.0.1/", "loopback", "127.0.0.1:80"),
        ("http://a@public.example@127.0.0.1:81/", "loopback", "127.0.0.1:81"),
        ("http://localhost/", "localhost is a loopback name", "localhost:80"),
        ("http://localhost./", "localhost is a loopback name", "localhost:80"),
        ("http://LocalHost:8080/", "loopback", "localhost:8080"),
        ("http://api.localhost/", "loopback", None),
        ("http://127\u30020\u30020\u30021/", "127.0.0.1 is a loopback", None),  # ideographic full stops
        ("http://\u2460\u2461\u2466.0.0.1/", "127.0.0.1 is a loopback", None),  # circled digits
        ("http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/", "localhost is a loopback name", None),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address", None),
        ("http://[fe80::1]/", "link-local", None),
        ("http://10.1.2.3/", "private", None),
        ("http://172.16.0.1/", "private", None),
        ("http://192.168.1.1/", "private", None),
        ("http://[fd00::1]/", "unique local", None),
        ("http://[fec0::1]/", "site-local", None),
        ("http://100.64.0.1/", "CGNAT", None),
        ("http://224.0.0.1/", "multicast", None),
        ("http://[ff02::1]/", "multicast", None),
        ("http://0.0.0.0/", "unspecified", None),
        ("http://0/", "0.0.0.0 is an unspecified", None),
        ("http://[::]/", "unspecified", None),
        ("http://0.1.2.3/", "'this network'", None),
        ("http://240.0.0.1/", "reserved", None),
        ("http://255.255.255.255/", "broadcast", None),
        ("http://192.0.2.1/", "non-global", None),
        ("http://[2001:db8::1]/", "non-global", None),
        ("http://[3fff::1]/", "documentation", None),
        ("http://[100::1]/", "not a global unicast", None),
        ("http://[2001:2::1]/", "non-global", None),
    ],
)
async def test_forbidden_spellings_are_refused(url: str, reason: str, target: str | None) -> None:
    guard = EgressGuard(EgressPolicy(), resolver=no_dns)
    with pytest.raises(EgressRefused) as caught:
        await guard.check(url)
    assert reason in caught.value.message
    assert caught.value.message.startswith("egress refused: ")
    if target is not None:
        assert caught.value.target == target


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/", "gopher://x/", "javascript:alert(1)"])
async def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(EgressRefused, match=r"scheme '.*' is not allowed"):
        await EgressGuard(EgressPolicy(), resolver=no_dns).check(url)


@pytest.mark.parametrize(
    "url",
    [
        "http:///path",
        "http://127.0.0.1:99999/",
        "http://127.0.0.1:0/",
        "http://[::1/",
        "http://%31%32%37.0.0.1/",
        "http://1.2.3.4.5/",
        "http://256.0.0.1/",
        "http://09.0.0.1/",
        "http://example.1/",
        "http://exa_mple-.com/",
        "http://[fe80::1%25eth0]/",
    ],
)
async def test_malformed_hosts_are_refused_without_dns(url: str) -> None:
    with pytest.raises(EgressRefused):
        await EgressGuard(EgressPolicy(), resolver=no_dns).check(url)


async def test_refusal_message_carries_no_credentials_or_query() -> None:
    guard = EgressGuard(EgressPolicy(), resolver=no_dns)
    for url in ["http://alice:s3cret@127.0.0.1/p?token=t0k", "ftp://alice:s3cret@host/?token=t0k"]:
        with pytest.raises(EgressRefused) as caught:
            await guard.check(url)
        for secret in ("alice", "s3cret", "token", "t0k"):
            assert secret not in caught.value.message
            assert secret not in caught.value.target


@pytest.mark.parametrize(
    ("url", "ip"),
    [
        ("http://93.184.216.34/a?b=1", "93.184.216.34"),
        ("https://1572395042/", "93.184.216.34"),  # decimal spelling of a public address
        ("http://[::ffff:93.184.216.34]/", "93.184.216.34"),  # IPv4-mapped public: connect over IPv4
        ("http://[::ffff:5db8:d822]/", "93.184.216.34"),
        ("http://[2606:2800:220:1:248:1893:25c8:1946]/", "2606:2800:220:1:248:1893:25c8:1946"),
        ("http://[64:ff9b::5db8:d822]/", "64:ff9b::5db8:d822"),  # NAT64 of a public address
    ],
)
async def test_public_literals_pass_without_dns(url: str, ip: str) -> None:
    resolved = await EgressGuard(EgressPolicy(), resolver=no_dns).check(url)
    assert resolved.ip == ip


async def test_check_returns_the_normalized_target() -> None:
    resolved = await EgressGuard(EgressPolicy(), resolver=no_dns).check("HTTP://u:p@93.184.216.34:8080/a/b?c=d#frag")
    assert (resolved.scheme, resolved.host, resolved.port) == ("http", "93.184.216.34", 8080)
    assert (resolved.path_and_query, resolved.target) == ("/a/b?c=d", "93.184.216.34:8080")


async def test_a_name_is_refused_when_any_answer_is_forbidden() -> None:
    calls: list[str] = []
    dns = fake_dns({"mixed.fake.test": ["93.184.216.34", "127.0.0.1"], "ok.fake.test": ["93.184.216.34"]}, calls)
    guard = EgressGuard(EgressPolicy(), resolver=dns)
    with pytest.raises(EgressRefused, match=r"mixed\.fake\.test resolves to 127\.0\.0\.1, which is a loopback"):
        await guard.check("http://mixed.fake.test/")
    with pytest.raises(EgressRefused, match=r"maps to 10\.0\.0\.1, which is a private"):
        await EgressGuard(EgressPolicy(), resolver=fake_dns({"m.fake.test": ["::ffff:10.0.0.1"]}, [])).check(
            "http://m.fake.test/"
        )
    resolved = await guard.check("https://OK.fake.test./x")
    assert (resolved.host, resolved.ip, resolved.target) == ("ok.fake.test", "93.184.216.34", "ok.fake.test:443")
    assert calls == ["mixed.fake.test", "ok.fake.test"]


async def test_a_name_that_does_not_exist_is_the_callers_mistake() -> None:
    # NXDOMAIN is an answer, not an outage: a retry cannot help, so it is not UNAVAILABLE with a Retry-After.
    guard = EgressGuard(EgressPolicy(), resolver=fake_dns({}, []))
    with pytest.raises(FailedPrecondition, match=r"could not resolve nowhere\.fake\.test:80: Name or service"):
        await guard.check("http://nowhere.fake.test/")


async def test_resolution_failures_and_slowness_are_unavailable() -> None:
    async def dns_down(host: str, port: int) -> Sequence[Any]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(Unavailable, match=r"could not resolve down\.fake\.test:80: Temporary failure"):
        await EgressGuard(EgressPolicy(), resolver=dns_down).check("http://down.fake.test/")

    async def slow(host: str, port: int) -> Sequence[Any]:
        await asyncio.sleep(10)
        return []

    with pytest.raises(Unavailable, match="timed out"):
        await EgressGuard(EgressPolicy(), resolve_timeout=0.05, resolver=slow).check("http://slow.fake.test/")


async def test_the_default_resolver_is_getaddrinfo_called_once() -> None:
    loop = asyncio.get_running_loop()
    calls: list[str] = []

    async def counting(host: str, port: int) -> Sequence[Any]:
        calls.append(host)
        return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    guard = EgressGuard(EgressPolicy.parse("localhost:8080"), resolver=counting)
    resolved = await guard.check("http://localhost:8080/")
    assert resolved.ip in {"127.0.0.1", "::1"}
    assert calls == ["localhost"]
    assert (await EgressGuard(EgressPolicy.parse("localhost:8080")).check("http://localhost:8080/")).ip


def test_policy_parse_accepts_hosts_and_cidrs() -> None:
    policy = EgressPolicy.parse(" 127.0.0.1:8080, [::1]:9000 ,Api.Fake.Test.:443, 0x7f000001:81, 10.0.0.0/8, ::1/128,")
    assert policy.allow[:4] == (
        HostPort("127.0.0.1", 8080),
        HostPort("::1", 9000),
        HostPort("api.fake.test", 443),
        HostPort("127.0.0.1", 81),
    )
    assert [str(n) for n in policy.allow[4:]] == ["10.0.0.0/8", "::1/128"]
    assert EgressPolicy.parse("").allow == ()


@pytest.mark.parametrize(
    "spec",
    ["127.0.0.1", "host:0", "host:65536", "host:http", ":80", "::1:80", "[::1:80", "10.0.0.0/33", "a b:80", "x/y"],
)
def test_policy_parse_rejects_bad_entries(spec: str) -> None:
    with pytest.raises(ValueError, match="ALTAN_EGRESS_ALLOW"):
        EgressPolicy.parse(f"example.com:443,{spec}")


async def test_exempted_and_unexempted_destinations(servers: Any, clients: Any) -> None:
    api = await servers({"/hello": (200, {"X-Reply": "yes", "Content-Type": "text/plain"}, b"hi")})
    result = await clients(api.origin).request("GET", f"http://{api.origin}/hello", params={"q": "a b"})
    assert (result.status, result.body, result.target) == (200, b"hi", api.origin)
    assert result.headers["x-reply"] == "yes" and result.retry_after is None
    assert api.seen[0].path == "/hello?q=a+b" and api.seen[0].headers["host"] == api.origin

    cidr = await clients("127.0.0.0/8").request("GET", f"http://0x7f000001:{api.port}/hello")
    assert cidr.status == 200 and api.seen[-1].headers["host"] == api.origin  # the normalized spelling

    mapped = await clients(api.origin).request("GET", f"http://[::ffff:127.0.0.1]:{api.port}/hello")
    assert mapped.status == 200 and api.seen[-1].headers["host"] == f"[::ffff:7f00:1]:{api.port}"

    with pytest.raises(EgressRefused, match="loopback") as caught:
        await clients(f"127.0.0.1:{api.port + 1}").request("GET", f"http://{api.origin}/hello")
    assert caught.value.target == api.origin and len(api.seen) == 3


async def test_a_name_connects_to_the_checked_address_with_its_host_header(servers: Any, clients: Any) -> None:
    api = await servers({"/v1/items": (201, {}, b"[]")})
    calls: list[str] = []
    # fake.test does not exist in real DNS, so the request can only succeed by using the pinned address.
    client = clients("127.0.0.0/8", resolver=fake_dns({"api.fake.test": ["127.0.0.1"]}, calls))
    url = f"http://api.fake.test:{api.port}/v1/items"
    result = await client.request("POST", url, json={"a": 1}, headers={"Host": "evil.example"})
    assert result.status == 201
    seen = api.seen[0]
    assert seen.headers["host"] == f"api.fake.test:{api.port}"
    assert (seen.body, seen.headers["content-type"]) == (b'{"a": 1}', "application/json")
    await client.request("GET", url)
    assert calls == ["api.fake.test", "api.fake.test"]  # once per request, never again by the HTTP stack


async def test_redirect_to_forbidden_address_is_refused(servers: Any, clients: Any) -> None:
    api = await servers(
        {
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/to-other-port": (307, {"Location": "http://127.0.0.1:1/"}, b""),
            "/to-v6": (301, {"Location": "http://[::1]/"}, b""),
        }
    )
    client = clients(api.origin)
    for path, reason in [("/to-metadata", "link-local"), ("/to-other-port", "loopback"), ("/to-v6", "loopback")]:
        with pytest.raises(EgressRefused, match=reason):
            await client.request("GET", f"http://{api.origin}{path}")


async def test_a_malformed_redirect_is_an_unusable_answer_not_an_outage(servers: Any, clients: Any) -> None:
    api = await servers(
        {"/bad": (302, {"Location": "http://[::1"}, b""), "/port": (302, {"Location": "http://h:99999/"}, b"")}
    )
    client = clients(api.origin)
    # httpx itself cannot read this Location: the answer is unusable (400), not an outage to retry (503).
    with pytest.raises(FailedPrecondition, match="answered a redirect to a malformed URL"):
        await client.request("GET", f"http://{api.origin}/bad")
    # This one httpx reads; the guard then refuses to go there.
    with pytest.raises(EgressRefused, match="the URL is malformed"):
        await client.request("GET", f"http://{api.origin}/port")


async def test_redirects_between_allowed_hops_drop_credentials_across_hosts(servers: Any, clients: Any) -> None:
    far = await servers({"/end": (200, {}, b"done")})
    near = await servers(
        {
            "/start": (302, {"Location": "/same-host"}, b""),
            "/same-host": (308, {"Location": f"http://{far.origin}/end"}, b""),
        }
    )
    client = clients(f"{near.origin},{far.origin}")
    headers = {"Authorization": "Bearer t", "Cookie": "c=1", "X-Api-Key": "k", "X-Trace": "abc"}
    result = await client.request(
        "GET", f"http://{near.origin}/start", headers=headers, sensitive_headers={"X-API-Key"}
    )
    assert (result.status, result.body, result.target) == (200, b"done", far.origin)
    assert near.seen[1].headers["authorization"] == "Bearer t"  # same host keeps credentials
    final = far.seen[0].headers
    assert final["x-trace"] == "abc"
    assert not {"authorization", "cookie", "x-api-key"} & final.keys()


async def test_redirect_methods(servers: Any, clients: Any) -> None:
    api = await servers(
        {
            "/see-other": (303, {"Location": "/landing"}, b""),
            "/found": (302, {"Location": "/landing"}, b""),
            "/temporary": (307, {"Location": "/landing"}, b""),
            "/landing": (200, {}, b"ok"),
        }
    )
    client = clients(api.origin)
    for path, method, body in [("/see-other", "GET", b""), ("/found", "GET", b""), ("/temporary", "POST", b"x")]:
        await client.request("POST", f"http://{api.origin}{path}", content=b"x", headers={"Content-Type": "a/b"})
        landing = api.seen[-1]
        assert (landing.method, landing.body) == (method, body)
        assert ("content-type" in landing.headers) == (method == "POST")


async def test_max_redirects_is_enforced(servers: Any, clients: Any) -> None:
    api = await servers({"/loop": (302, {"Location": "/loop"}, b"")})
    with pytest.raises(FailedPrecondition, match="too many redirects"):
        await clients(api.origin, max_redirects=3).request("GET", f"http://{api.origin}/loop")
    assert len(api.seen) == 4


async def test_dns_is_resolved_once_per_hop(servers: Any, clients: Any) -> None:
    api = await servers({"/b": (200, {}, b"")})
    api.routes["/a"] = (302, {"Location": f"http://b.fake.test:{api.port}/b"}, b"")
    calls: list[str] = []
    dns = fake_dns({"a.fake.test": ["127.0.0.1"], "b.fake.test": ["127.0.0.1"]}, calls)
    result = await clients(f"a.fake.test:{api.port},b.fake.test:{api.port}", resolver=dns).request(
        "GET", f"http://a.fake.test:{api.port}/a"
    )
    assert result.status == 200 and calls == ["a.fake.test", "b.fake.test"]


async def test_retry_after_is_parsed(servers: Any, clients: Any) -> None:
    later = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60), usegmt=True)
    api = await servers(
        {
            "/seconds": (429, {"Retry-After": "7"}, b""),
            "/date": (503, {"Retry-After": later}, b""),
            "/junk": (503, {"Retry-After": "soon"}, b""),
        }
    )
    client = clients(api.origin)
    assert (await client.request("GET", f"http://{api.origin}/seconds")).retry_after == 7.0
    from_date = (await client.request("GET", f"http://{api.origin}/date")).retry_after
    assert from_date is not None and 50 < from_date <= 60
    assert (await client.request("GET", f"http://{api.origin}/junk")).retry_after is None


async def test_a_used_up_rate_limit_asks_to_wait_until_its_reset(servers: Any, clients: Any) -> None:
    epoch = str(int(time.time()) + 60)
    api = await servers(
        {
            "/delta": (200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "12"}, b""),
            "/epoch": (429, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": epoch}, b""),
            "/draft": (200, {"RateLimit-Remaining": "0", "RateLimit-Reset": "5"}, b""),
            "/left": (200, {"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "12"}, b""),
            "/both": (429, {"Retry-After": "2", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "12"}, b""),
        }
    )
    client = clients(api.origin)
    asked = {path: (await client.request("GET", f"http://{api.origin}{path}")).retry_after for path in api.routes}
    assert (asked["/delta"], asked["/draft"], asked["/left"], asked["/both"]) == (12.0, 5.0, None, 2.0)
    assert asked["/epoch"] is not None and 50 < asked["/epoch"] <= 60


async def test_connection_refused_is_unavailable(clients: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Unavailable, match=f"could not reach 127.0.0.1:{port}") as caught:
        await clients(f"127.0.0.1:{port}").request("GET", f"http://user:s3cret@127.0.0.1:{port}/?k=v")
    assert "s3cret" not in caught.value.message and "k=v" not in caught.value.message


async def test_timeouts_are_unavailable(servers: Any, clients: Any) -> None:
    api = await servers({"/hang": "hang"})
    with pytest.raises(Unavailable, match="timed out"):
        await clients(api.origin).request("GET", f"http://{api.origin}/hang", timeout=0.2)


async def test_oversized_responses_are_refused(servers: Any, clients: Any) -> None:
    api = await servers({"/big": (200, {}, b"x" * 100), "/stream": "stream"})
    client = clients(api.origin, max_response_bytes=50)
    with pytest.raises(FailedPrecondition, match="larger than 50 bytes"):
        await client.request("GET", f"http://{api.origin}/big")
    with pytest.raises(FailedPrecondition, match="larger than 50 bytes"):
        await client.request("GET", f"http://{api.origin}/stream")


async def test_cookies_are_never_replayed(servers: Any, clients: Any) -> None:
    api = await servers({"/set": (200, {"Set-Cookie": "sid=tenant-a; Path=/"}, b""), "/get": (200, {}, b"")})
    client = clients(api.origin)
    await client.request("GET", f"http://{api.origin}/set")
    await client.request("GET", f"http://{api.origin}/get")
    assert "cookie" not in api.seen[-1].headers


def _tls_for(name: str, tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for ``name`` only, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


async def test_tls_verifies_the_real_name_on_the_pinned_address(servers: Any, clients: Any, tmp_path: Path) -> None:
    server_tls, trust = _tls_for("api.fake.test", tmp_path)
    api = await servers({"/secure": (200, {}, b"tls ok")}, tls=server_tls)
    dns = fake_dns({"api.fake.test": ["127.0.0.1"], "other.fake.test": ["127.0.0.1"]}, [])
    client = clients("127.0.0.0/8", resolver=dns, verify=trust)
    result = await client.request("GET", f"https://api.fake.test:{api.port}/secure")
    assert (result.body, api.seen[0].headers["host"]) == (b"tls ok", f"api.fake.test:{api.port}")
    # Same address, other name: the pooled connection verified for api.fake.test must not be reused, and the
    # certificate does not cover other.fake.test, nor the bare IP.
    for url in [f"https://other.fake.test:{api.port}/secure", f"https://127.0.0.1:{api.port}/secure"]:
        with pytest.raises(Unavailable, match=r"could not reach .*certificate verify failed"):
            await client.request("GET", url)
    assert len(api.seen) == 1


async def test_a_streamed_answer_is_read_line_by_line_within_the_limits(servers: Any, clients: Any) -> None:
    events = b"data: one\n\ndata: two\n\n"
    api = await servers(
        {
            "/events": (200, {"Content-Type": "text/event-stream", "Retry-After": "3"}, events),
            "/hop": (307, {"Location": "/events"}, b""),
            "/big": (200, {}, b"x" * 5000 + b"\n"),
        }
    )
    client = clients(api.origin, max_response_bytes=1024)
    async with client.stream("POST", f"http://{api.origin}/hop", json={"q": 1}) as response:
        assert (response.status, response.target, response.retry_after) == (200, api.origin, 3.0)
        assert [line async for line in response.lines()] == ["data: one", "", "data: two", ""]
    assert [seen.path for seen in api.seen] == ["/hop", "/events"]
    assert api.seen[1].body == b'{"q": 1}'  # a 307 keeps the method and the body
    async with client.stream("GET", f"http://{api.origin}/big") as response:
        with pytest.raises(FailedPrecondition, match="larger than 1024 bytes"):
            [line async for line in response.lines()]
    with pytest.raises(EgressRefused):
        async with client.stream("GET", "http://169.254.169.254/latest/"):
            pass


# --- a credential's hosts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hosts", "url", "allowed"),
    [
        (["api.example.com"], "https://api.example.com/v1", True),
        (["api.example.com"], "https://API.Example.COM./v1", True),  # case and the trailing dot
        (["API.example.com."], "https://api.example.com:443/", True),
        (["api.example.com"], "http://api.example.com/", False),  # no port: https on 443 only
        (["api.example.com"], "https://api.example.com:8443/", False),
        (["api.example.com:8443"], "https://api.example.com:8443/", True),
        (["api.example.com:8080"], "http://api.example.com:8080/", True),  # an admin named the port
        (["api.example.com"], "https://api.example.com.evil.net/", False),
        (["api.example.com"], "https://evil.net/api.example.com", False),
        (["api.example.com"], "https://api.example.com@evil.net/", False),
        # One parser decides both the check and the connection: this is userinfo "evil.net\" and host
        # api.example.com, and the request goes to api.example.com without the userinfo.
        (["api.example.com"], "https://evil.net\\@api.example.com/", True),
        (["api.example.com"], "https://evil.net#@api.example.com/", False),
        (["api.example.com"], "https://sub.api.example.com/", False),  # no wildcards
        (["bücher.example"], "https://xn--bcher-kva.example/", True),  # IDNA
        (["xn--bcher-kva.example"], "https://BÜCHER.example/", True),
        (["10.0.0.5:8443"], "https://0x0a000005:8443/", True),
        (["10.0.0.5:8443"], "https://10.5:8443/", True),
        (["10.0.0.5:8443"], "https://[::ffff:10.0.0.5]:8443/", True),
        (["[2001:db8::1]:8443"], "https://[2001:DB8:0::1]:8443/", True),
        (["localhost:8080"], "http://127.0.0.1:8080/", False),  # another name, even for the same address
        (["api.example.com"], "ftp://api.example.com/", False),
        (["api.example.com"], "not a url", False),
        ([], "https://api.example.com/", False),
    ],
)
def test_a_credential_goes_only_to_its_hosts_in_any_spelling(hosts: list[str], url: str, allowed: bool) -> None:
    assert HostBinding.parse(hosts).allows_url(url) is allowed


@pytest.mark.parametrize("entry", ["a..b", "api.example.com:0", "api.example.com:70000", "2001:db8::1", "ex ample", ""])
def test_host_entries_that_are_not_hosts_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        HostBinding.parse([entry])


# --- the connection pools -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("connections", "sizes"), [(1, [1]), (64, [64]), (100, [50, 50]), (130, [44, 43, 43])])
def test_connections_are_split_into_pools_of_at_most_64(connections: int, sizes: list[int]) -> None:
    assert outbound._shard_sizes(connections) == sizes


async def test_requests_go_to_the_least_busy_pool_and_one_pool_serves_a_light_load(servers: Any, clients: Any) -> None:
    api = await servers({"/fast": (200, {}, b"ok"), "/slow": "hang"})
    client = clients(api.origin, max_connections=130)
    sharded = client._client._transport._pool
    for _ in range(3):  # one after the other: the first pool, its one kept-alive connection
        await client.request("GET", f"http://{api.origin}/fast")
    assert [len(pool.connections) for pool in sharded._pools] == [1, 0, 0]
    assert sharded._active == [0, 0, 0]
    calls = [asyncio.create_task(client.request("GET", f"http://{api.origin}/slow", timeout=5)) for _ in range(6)]
    async with asyncio.timeout(5):
        await api.received("/slow", 6)  # each is in a pool, waiting for its answer
    assert sharded._active == [2, 2, 2]  # spread evenly
    await api.stop()  # the answers never come: the connections drop
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert sharded._active == [0, 0, 0]  # a failed request frees its place too
