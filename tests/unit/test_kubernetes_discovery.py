"""Tool discovery through the Kubernetes API (services/tool/kubernetes_discovery.py): the official client, configured
to a fake API server on a real socket (tests/fakes/kubernetes.py), lists and watches labelled Services; the
addresses go to ContainerTools, whose containers are real SDK servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from altan.errors import Unavailable
from services.tool.kubernetes_discovery import ServiceWatch, service_address, service_namespace
from tests.fakes.kubernetes import FakeKubernetes, start_fake_kubernetes
from tests.unit.test_tool_containers import Servers, caller, catalogue, echo, servers, whoami

__all__ = ["caller", "servers"]  # fixtures of test_tool_containers, used here

NS = "acme"
GRPC = [{"name": "grpc", "port": 7000, "targetPort": "grpc", "protocol": "TCP"}]


def api_for(fake: FakeKubernetes, token: str | None = None) -> client.CoreV1Api:
    configuration = client.Configuration(host=fake.url)
    configuration.api_key = {"BearerToken": token or fake.token}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return client.CoreV1Api(client.ApiClient(configuration))


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    server = start_fake_kubernetes()
    yield server
    server.close()


class Seen:
    """What the watch handed over, one set of addresses at a time."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[frozenset[str]] = asyncio.Queue()

    async def __call__(self, addresses: Collection[str]) -> None:
        await self.queue.put(frozenset(addresses))

    async def next(self) -> frozenset[str]:
        async with asyncio.timeout(10):
            return await self.queue.get()


@pytest.fixture
async def seen(fake: FakeKubernetes) -> AsyncIterator[tuple[Seen, ServiceWatch]]:
    got = Seen()
    follower = ServiceWatch(api_for(fake), NS, got)
    yield got, follower
    await follower.aclose()


def test_the_address_is_the_services_dns_name_and_its_grpc_port() -> None:
    service = {
        "metadata": {"name": "altan-tool-weather", "namespace": NS},
        "spec": {"clusterIP": "10.1.2.3", "ports": [{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 7000}]},
    }
    assert service_address(service) == "altan-tool-weather.acme.svc:7000"
    assert service_address(service, "cluster-ip") == "10.1.2.3:7000"
    first = {"metadata": {"name": "ocr", "namespace": NS}, "spec": {"ports": [{"port": 9000}, {"port": 9001}]}}
    assert service_address(first) == "ocr.acme.svc:9000"
    v6 = {"metadata": {"name": "ocr", "namespace": NS}, "spec": {"clusterIP": "fd00::1", "ports": [{"port": 9000}]}}
    assert service_address(v6, "cluster-ip") == "[fd00::1]:9000"
    headless = {"metadata": {"name": "ocr", "namespace": NS}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}
    assert service_address(headless, "cluster-ip") is None
    assert service_address({"metadata": {"name": "none", "namespace": NS}, "spec": {}}) is None


def test_the_namespace_is_the_setting_else_the_service_accounts(tmp_path: Path) -> None:
    assert service_namespace("tenant-a", tmp_path / "missing") == "tenant-a"
    (tmp_path / "namespace").write_text("tenant-b\n")
    assert service_namespace("", tmp_path / "namespace") == "tenant-b"
    with pytest.raises(ValueError, match="ALTAN_TOOL_DISCOVERY_NAMESPACE is not set"):
        service_namespace("", tmp_path / "missing")


async def test_lists_then_follows_added_modified_and_deleted_services(
    fake: FakeKubernetes, seen: tuple[Seen, ServiceWatch]
) -> None:
    got, follower = seen
    fake.put(NS, "weather", GRPC)
    fake.put(NS, "unlabelled", GRPC, labels={"app": "other"})
    fake.put("other-tenant", "theirs", GRPC)
    await follower.start(wait_seconds=10)
    assert await got.next() == {"weather.acme.svc:7000"}
    list_request = fake.requests[0]
    assert list_request.path == f"/api/v1/namespaces/{NS}/services"
    assert list_request.query["labelSelector"] == "altan.io/tool-container=true"
    assert list_request.authorization == f"Bearer {fake.token}"

    fake.put(NS, "ocr", [{"name": "grpc", "port": 9000}])
    assert await got.next() == {"weather.acme.svc:7000", "ocr.acme.svc:9000"}
    fake.put(NS, "ocr", [{"name": "grpc", "port": 9001}])
    assert await got.next() == {"weather.acme.svc:7000", "ocr.acme.svc:9001"}
    fake.delete(NS, "weather")
    assert await got.next() == {"ocr.acme.svc:9001"}
    watch = next(r for r in fake.requests if r.query.get("watch") == "true")
    assert watch.query["resourceVersion"] == "103" and watch.query["allowWatchBookmarks"] == "true"
    assert fake.lists() == 1


async def test_an_expired_watch_lists_again(fake: FakeKubernetes, seen: tuple[Seen, ServiceWatch]) -> None:
    """410 Gone as an ERROR event (what an API server sends when its history is gone), and as the answer's status:
    each time a new list, which also finds what changed while the history was lost."""
    got, follower = seen
    fake.put(NS, "weather", GRPC)
    await follower.start(wait_seconds=10)
    assert await got.next() == {"weather.acme.svc:7000"}
    await asyncio.to_thread(fake.wait_for_watches, 1)

    fake.compact()  # the open watch gets the ERROR event
    fake.put(NS, "ocr", [{"name": "grpc", "port": 9000}])
    assert await got.next() == {"weather.acme.svc:7000", "ocr.acme.svc:9000"}
    await asyncio.to_thread(fake.wait_for_watches, 2)
    assert fake.lists() == 2

    fake.expire_next_watch()  # the watch after the next list is refused with the status itself
    fake.compact()
    fake.put(NS, "pdf", [{"port": 8080}])
    assert await got.next() == {"weather.acme.svc:7000", "ocr.acme.svc:9000", "pdf.acme.svc:8080"}
    await asyncio.to_thread(fake.wait_for_watches, 4)
    assert fake.lists() == 4  # after the ERROR event, then after the refused watch


async def test_a_refused_token_changes_nothing_and_stops_cleanly(
    fake: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    got = Seen()
    follower = ServiceWatch(api_for(fake, token="wrong"), NS, got)
    await follower.start(wait_seconds=0.5)
    assert got.queue.empty()
    await follower.aclose()
    assert any("401" in str(r.__dict__.get("error")) for r in caplog.records), caplog.text


async def test_a_stop_ends_a_watch_that_is_waiting(fake: FakeKubernetes) -> None:
    got = Seen()
    follower = ServiceWatch(api_for(fake), NS, got)
    await follower.start(wait_seconds=10)
    assert await got.next() == frozenset()
    await follower.aclose()
    assert follower._thread is not None and not follower._thread.is_alive()


async def test_discovered_containers_join_and_leave_the_catalogue(servers: Servers, caller: None) -> None:
    listed = await servers.start([whoami])
    found = await servers.start([echo, whoami])
    tools = catalogue([listed])
    try:
        await tools.start()
        await tools.discovered([found, listed])  # ALTAN_TOOL_CONTAINERS' own is not discovered again
        assert [(t["tool_id"], t["container"]) for t in tools.all()] == [("echo", found), ("whoami", listed)]
        echo_tool = tools.get("echo")
        assert echo_tool is not None and await tools.invoke(echo_tool, {"text": "hi"}, 5) == "hi"
        await tools.discovered([])
        assert [t["tool_id"] for t in tools.all()] == ["whoami"]
        with pytest.raises(Unavailable, match="no longer served"):
            await tools.invoke(echo_tool, {"text": "hi"}, 5)
    finally:
        await tools.aclose()


async def test_services_added_and_deleted_bring_and_take_tools(
    fake: FakeKubernetes, servers: Servers, caller: None
) -> None:
    """The whole path: a Service ADDED makes its container's tools appear, DELETED makes them go."""
    address = await servers.start([echo])
    port = int(address.rsplit(":", 1)[1])
    tools = catalogue([])
    applied: asyncio.Queue[None] = asyncio.Queue()

    async def discovered(addresses: Collection[str]) -> None:
        await tools.discovered(addresses)
        await applied.put(None)

    follower = ServiceWatch(api_for(fake), NS, discovered, address_mode="cluster-ip")
    try:
        await tools.start()
        await follower.start(wait_seconds=10)
        assert tools.all() == []
        fake.put(NS, "echo", [{"name": "grpc", "port": port}])
        async with asyncio.timeout(10):
            await applied.get()  # the first list
            await applied.get()
        assert [t["tool_id"] for t in tools.all()] == ["echo"]
        fake.delete(NS, "echo")
        async with asyncio.timeout(10):
            await applied.get()
        assert tools.all() == []
    finally:
        await follower.aclose()
        await tools.aclose()
