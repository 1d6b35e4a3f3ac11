"""The Tool Service's view of tool containers (services/tool/containers.py) against real SDK containers on
127.0.0.1:0: discovery, who keeps a tool id, tools that come and go, a container that goes away."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from altan import context
from altan.auth import TokenVerifier, issue_development_token
from altan.clients import ToolContainerClient
from altan.config import Settings
from altan.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from altan.sdk import Tool, ToolContext, tool
from altan.sdk.container import ToolContainerServicer
from altan.server import AuthInterceptor
from altan.store import TenantStore, open_backend
from altan.v1 import container_pb2_grpc
from services.tool.builtins import BUILTIN_TOOLS
from services.tool.containers import ContainerTools
from services.tool.registry import ToolRegistry

SETTINGS = Settings(jwt_secret="a-unit-test-secret-that-is-long-enough-0123")


@tool
def echo(text: str) -> str:
    """Echoes."""
    return text


@tool(tool_id="echo")
def other_echo(text: str) -> str:
    """Echoes, elsewhere."""
    return text.upper()


@tool
def json_extract(path: str) -> str:
    """Takes a built-in's name."""
    return path


@tool
def whoami(ctx: ToolContext) -> str:
    """Who called."""
    return ctx.tenant_id


class Servers:
    """SDK containers on free ports, each started and stopped at will."""

    def __init__(self) -> None:
        self.running: dict[str, grpc.aio.Server] = {}

    async def start(self, tools: list[Tool[..., Any]], port: int = 0) -> str:
        server = grpc.aio.server(interceptors=[AuthInterceptor(TokenVerifier(SETTINGS))])
        container_pb2_grpc.add_ToolContainerServiceServicer_to_server(ToolContainerServicer(tools), server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        address = f"127.0.0.1:{bound}"
        self.running[address] = server
        return address

    async def stop(self, address: str) -> None:
        await self.running.pop(address).stop(None)


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    started = Servers()
    yield started
    for address in list(started.running):
        await started.stop(address)


@pytest.fixture
def caller() -> None:
    token = issue_development_token(SETTINGS, tenant="acme", sub="alice", role="admin")
    context.bind(TokenVerifier(SETTINGS).verify(f"Bearer {token}"))


def catalogue(addresses: list[str]) -> ContainerTools:
    connect: Callable[[str], ToolContainerClient] = lambda address: ToolContainerClient(address, 5)  # noqa: E731
    return ContainerTools(addresses, reserved=BUILTIN_TOOLS, refresh_seconds=30, max_output_bytes=1024, connect=connect)


async def test_the_first_container_keeps_an_id_and_a_builtins_id_is_refused(
    servers: Servers, caller: None, caplog: pytest.LogCaptureFixture
) -> None:
    first = await servers.start([echo, whoami])
    second = await servers.start([other_echo, json_extract])
    tools = catalogue([first, second])
    caplog.set_level(logging.INFO)
    try:
        await tools.start()
        assert [t["tool_id"] for t in tools.all()] == ["echo", "whoami"]
        echo_tool = tools.get("echo")
        assert echo_tool is not None and echo_tool["container"] == first and echo_tool["type"] == "container"
        assert await tools.invoke(echo_tool, {"text": "hi"}, 5) == "hi"
        whoami_tool = tools.get("whoami")
        assert whoami_tool is not None and await tools.invoke(whoami_tool, {}, 5) == "acme"
        refused = {(r.__dict__["tool_id"], r.__dict__["container"]) for r in caplog.records if "refused" in r.message}
        assert refused == {("json_extract", second), ("echo", second)}
    finally:
        await tools.aclose()


async def test_errors_of_a_tool_come_back_as_they_were_raised(servers: Servers, caller: None) -> None:
    tools = catalogue([await servers.start([echo])])
    try:
        await tools.start()
        echo_tool = tools.get("echo")
        assert echo_tool is not None
        with pytest.raises(InvalidArgument, match="text: required"):
            await tools.invoke(echo_tool, {}, 5)
        with pytest.raises(FailedPrecondition, match=r"over the limit of 1024 \(ALTAN_MAX_OUTPUT_BYTES\)"):
            await tools.invoke(echo_tool, {"text": "x" * 2000}, 5)
    finally:
        await tools.aclose()


async def test_a_container_that_goes_away_keeps_its_tools_which_fail_unavailable(
    servers: Servers, caller: None
) -> None:
    address = await servers.start([echo])
    tools = catalogue([address, "127.0.0.1:1"])  # the second one never answers: the catalogue does not mind
    try:
        await tools.start()
        await servers.stop(address)
        echo_tool = tools.get("echo")
        assert echo_tool is not None
        with pytest.raises(Unavailable, match=f"tool container {address} is unavailable"):
            await tools.invoke(echo_tool, {"text": "hi"}, 5)
        assert [t["tool_id"] for t in tools.all()] == ["echo"]
    finally:
        await tools.aclose()


async def test_tools_come_and_go_with_the_containers_list(servers: Servers, caller: None) -> None:
    address = await servers.start([echo, whoami])
    port = int(address.rsplit(":", 1)[1])
    tools = catalogue([address])
    try:
        await tools.start()
        assert tools.get("whoami") is not None
        await servers.stop(address)
        await servers.start([echo], port)  # redeployed without whoami
        deadline = time.monotonic() + 10
        while tools.get("whoami") is not None:  # until the channel has reconnected and the list was read again
            assert time.monotonic() < deadline, "the new list was not read"
            tools._containers[0].wake.set()  # what a failed call does
            await asyncio.sleep(0.05)
        assert [t["tool_id"] for t in tools.all()] == ["echo"]
    finally:
        await tools.aclose()


async def test_the_registry_puts_container_tools_after_the_builtins_and_custom_ones_shadow_them(
    servers: Servers, caller: None
) -> None:
    tools = catalogue([await servers.start([echo])])
    backend = open_backend(None)
    try:
        await tools.start()
        registry = ToolRegistry(TenantStore(backend, "tool"), tools)
        listed = [t["tool_id"] for t in await registry.all()]
        assert listed == [*BUILTIN_TOOLS, "echo"]
        assert (await registry.get("echo"))["type"] == "container"
        assert [t["tool_id"] for t in await registry.some(["echo", "nope", "parse_email"])] == ["echo", "parse_email"]
        with pytest.raises(NotFound):
            await registry.get("nope")
    finally:
        await tools.aclose()
        await backend.aclose()
