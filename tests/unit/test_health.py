"""altan.health: a service's gRPC health follows what it needs (its state backend), asked on demand and cached."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from altan.auth import TokenVerifier
from altan.config import Settings
from altan.health import CachedProbe
from altan.server import GrpcService, serve_until_stopped
from altan.v1 import agent_pb2_grpc, tool_pb2_grpc
from tests.e2e.stack import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Dependency:
    """A probe target whose answer the test sets; counts how often it was asked."""

    up: bool = True
    asked: int = 0
    fails: bool = False

    async def ping(self) -> bool:
        self.asked += 1
        await asyncio.sleep(0)
        if self.fails:
            raise ConnectionError("down")
        return self.up


async def test_an_answer_is_kept_for_the_ttl_then_asked_again() -> None:
    dependency, clock = Dependency(), Clock()
    probe = CachedProbe(dependency.ping, ttl=1.0, clock=clock)
    assert await probe() is True
    dependency.up = False
    clock.now += 0.9
    assert await probe() is True and dependency.asked == 1
    clock.now += 0.2
    assert await probe() is False and dependency.asked == 2


async def test_concurrent_checks_share_one_ask() -> None:
    dependency = Dependency()
    probe = CachedProbe(dependency.ping, ttl=1.0, clock=Clock())
    assert await asyncio.gather(*(probe() for _ in range(20))) == [True] * 20
    assert dependency.asked == 1


async def test_a_probe_that_raises_or_hangs_means_not_ready() -> None:
    assert await CachedProbe(Dependency(fails=True).ping)() is False
    hang = asyncio.Event()

    async def hanging() -> bool:
        await hang.wait()
        return True

    assert await CachedProbe(hanging, timeout=0.05)() is False


# --- through a real server ----------------------------------------------------------------------------------------


@functools.cache
def settings() -> Settings:
    return Settings(jwt_secret="health-test-hs256-secret-that-is-long-enough", jwt_algorithms=("HS256",))


@dataclass
class Running:
    health: health_pb2_grpc.HealthStub
    agent_store: Dependency
    tool_store: Dependency

    async def status(self, service: str) -> int:
        return int((await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status)


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    address = f"127.0.0.1:{free_port()}"
    agent_store, tool_store = Dependency(), Dependency()
    services = [
        GrpcService(
            agent_pb2_grpc.add_AgentServiceServicer_to_server,
            agent_pb2_grpc.AgentServiceServicer(),
            "altan.v1.AgentService",
            ready=agent_store.ping,
        ),
        GrpcService(
            tool_pb2_grpc.add_ToolServiceServicer_to_server,
            tool_pb2_grpc.ToolServiceServicer(),
            "altan.v1.ToolService",
            ready=tool_store.ping,
        ),
    ]
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve_until_stopped(services, verifier=TokenVerifier(settings()), address=address, grace_seconds=0, stop=stop)
    )
    channel = grpc.aio.insecure_channel(address)
    await asyncio.wait_for(channel.channel_ready(), 10)
    try:
        yield Running(health_pb2_grpc.HealthStub(channel), agent_store, tool_store)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await channel.close()


async def wait_for_status(running: Running, service: str, status: int) -> None:
    """The probe's answer is cached for about a second: ask until it changes, within a deadline."""
    deadline = time.monotonic() + 10
    while await running.status(service) != status:
        assert time.monotonic() < deadline, f"{service or 'the server'} never became {status}"
        await asyncio.sleep(0.05)


async def test_health_follows_each_services_dependency(server: Running) -> None:
    for name in ("", "altan.v1.AgentService", "altan.v1.ToolService"):
        assert await server.status(name) == SERVING
    server.tool_store.up = False
    await wait_for_status(server, "altan.v1.ToolService", NOT_SERVING)
    assert await server.status("") == NOT_SERVING  # the whole server needs every service's dependency
    assert await server.status("altan.v1.AgentService") == SERVING
    server.tool_store.up = True
    await wait_for_status(server, "", SERVING)
    assert await server.status("altan.v1.ToolService") == SERVING


async def test_a_failing_dependency_is_not_serving_and_unknown_services_stay_not_found(server: Running) -> None:
    server.agent_store.fails = True
    await wait_for_status(server, "altan.v1.AgentService", NOT_SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.status("altan.v1.Nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
