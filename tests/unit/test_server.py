"""altan.server.serve_until_stopped and the typed clients of altan.clients over a real grpc.aio server on 127.0.0.1.

The servicers are fakes of our own protos, defined here: they report who the server says is calling and raise
domain errors on demand, so the tests see exactly what the bootstrap does around a handler.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from altan import context, telemetry
from altan.auth import TokenVerifier, issue_development_token
from altan.clients import AgentClient, ServiceChannel, ToolClient
from altan.config import Settings
from altan.context import RequestContext
from altan.errors import (
    AltanError,
    DeadlineExceeded,
    InternalError,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from altan.listen import CannotListen
from altan.server import UNTRACED_METHODS, GrpcService, serve_until_stopped
from altan.v1 import agent_pb2, agent_pb2_grpc, tool_pb2, tool_pb2_grpc

SECRET = "unit-test-hs256-secret-that-is-long-enough-for-sha256-and-then-some"


@functools.cache
def settings() -> Settings:
    return Settings(jwt_secret=SECRET, jwt_algorithms=("HS256",), jwt_jwks_url=None, jwt_jwks_file=None)


# Every status-carrying domain error (EgressRefused travels as its base, PermissionDenied).
ERRORS: dict[str, type[AltanError]] = {
    cls.__name__: cls for cls in AltanError.__subclasses__() if cls.__module__ == "altan.errors"
}
LEAKY = "Traceback (most recent call last): /srv/secret/path.py line 42 password=hunter2"


def token(tenant: str = "acme", sub: str = "alice", role: str = "admin") -> str:
    return issue_development_token(settings(), tenant=tenant, sub=sub, role=role, ttl=300)


def as_caller(bearer: str) -> RequestContext:
    """Bind the caller that a token proves, as the gateway or a calling service would have it."""
    ctx = TokenVerifier(settings()).verify(f"Bearer {bearer}")
    context.bind(ctx)
    return ctx


@dataclass
class Calls:
    """What the handlers saw."""

    seen: list[RequestContext] = field(default_factory=list)


class FakeToolService(tool_pb2_grpc.ToolServiceServicer):
    """GetTool answers with the caller; its tool_id picks a failure: ``raise:<Error>:<message>``, ``boom``,
    ``slow-down``, ``relay`` (calls this same service again through a ToolClient, as the next hop would)."""

    def __init__(self, calls: Calls, relay: ToolClient) -> None:
        self._calls = calls
        self._relay = relay

    async def GetTool(self, request: tool_pb2.GetToolRequest, ctx: Any) -> tool_pb2.GetToolResponse:
        caller = context.current()
        self._calls.seen.append(caller)
        kind, _, rest = request.tool_id.partition(":")
        if kind == "raise":
            name, _, message = rest.partition(":")
            raise ERRORS[name](message)
        if kind == "boom":
            raise RuntimeError(LEAKY)
        if kind == "slow-down":
            raise ResourceExhausted("rate limited", retry_after=float(rest or 3))
        if kind == "relay":
            return await self._relay.call(self._relay.catalog.GetTool, tool_pb2.GetToolRequest(tool_id="who"))
        return tool_pb2.GetToolResponse(
            tool=tool_pb2.Tool(
                tool_id=request.tool_id,
                name=caller.tenant_id,
                description=caller.user,
                endpoint=caller.role,
                credential=caller.token,
            )
        )


class FakeAgentService(agent_pb2_grpc.AgentServiceServicer):
    """StreamTaskEvents: three events labelled with the caller's tenant, then NotFound for task ``gone``."""

    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def StreamTaskEvents(
        self, request: agent_pb2.StreamTaskEventsRequest, ctx: Any
    ) -> AsyncIterator[agent_pb2.StreamTaskEventsResponse]:
        caller = context.current()
        self._calls.seen.append(caller)
        for seq in range(request.after_seq + 1, 4):
            event = agent_pb2.TaskEvent(seq=seq, type="step", task_id=request.task_id, step_id=caller.tenant_id)
            yield agent_pb2.StreamTaskEventsResponse(event=event)
            if request.task_id == "gone" and seq == 2:
                raise NotFound("task 'gone' not found")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    address: str
    stop: asyncio.Event
    task: asyncio.Task[None]
    calls: Calls
    tools: ToolClient
    agents: AgentClient
    channel: grpc.aio.Channel


async def wait_serving(client: ServiceChannel, task: asyncio.Task[None]) -> None:
    """Until the server answers SERVING (or its task dies), at most 10 s."""
    deadline = time.monotonic() + 10
    while not await client.healthy(timeout=1):
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "server did not become healthy"
        await asyncio.sleep(0.02)


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    address = f"127.0.0.1:{free_port()}"
    calls = Calls()
    relay = ToolClient(address, 5)
    services = [
        GrpcService(
            tool_pb2_grpc.add_ToolServiceServicer_to_server,
            FakeToolService(calls, relay),
            "altan.v1.ToolService",
        ),
        GrpcService(
            agent_pb2_grpc.add_AgentServiceServicer_to_server, FakeAgentService(calls), "altan.v1.AgentService"
        ),
    ]
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve_until_stopped(services, verifier=TokenVerifier(settings()), address=address, grace_seconds=0.5, stop=stop)
    )
    tools = ToolClient(address, 5)
    agents = AgentClient(address, 5)
    channel = grpc.aio.insecure_channel(address)
    try:
        await wait_serving(tools, task)
        yield Running(address, stop, task, calls, tools, agents, channel)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        for client in (tools, agents, relay):
            await client.aclose()
        await channel.close()


def raw_get_tool(running: Running, tool_id: str, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    stub = tool_pb2_grpc.ToolServiceStub(running.channel)
    return stub.GetTool(tool_pb2.GetToolRequest(tool_id=tool_id), metadata=metadata, timeout=5)


# --- authentication -----------------------------------------------------------------------------------------------


BAD_AUTHORIZATION: dict[str, Callable[[], tuple[tuple[str, str], ...]]] = {
    "no-token": lambda: (),
    "garbage": lambda: (("authorization", "Bearer not-a-jwt"),),
    "not-bearer": lambda: (("authorization", f"Basic {token()}"),),
    "bad-signature": lambda: (
        ("authorization", "Bearer " + jwt.encode({"tenant_id": "acme"}, SECRET * 2, algorithm="HS256")),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_AUTHORIZATION))
async def test_unauthenticated_calls_never_reach_the_handler(server: Running, case: str) -> None:
    metadata = BAD_AUTHORIZATION[case]()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_get_tool(server, "who", metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught_stream:
        stub = agent_pb2_grpc.AgentServiceStub(server.channel)
        async for _ in stub.StreamTaskEvents(agent_pb2.StreamTaskEventsRequest(task_id="t"), metadata=metadata):
            pass
    assert caught_stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.calls.seen == []


async def test_handler_sees_the_caller_from_the_token(server: Running) -> None:
    bearer = token(tenant="globex", sub="bob", role="member")
    answer = await raw_get_tool(server, "who", (("authorization", f"Bearer {bearer}"),))
    tool = answer.tool
    assert (tool.name, tool.description, tool.endpoint, tool.credential) == ("globex", "bob", "member", bearer)
    assert server.calls.seen == [RequestContext("globex", "bob", "member", bearer)]


async def test_service_client_forwards_the_callers_token(server: Running) -> None:
    bearer = token(tenant="initech", sub="carol")
    as_caller(bearer)
    answer = await server.tools.call(server.tools.catalog.GetTool, tool_pb2.GetToolRequest(tool_id="who"))
    assert (answer.tool.name, answer.tool.credential) == ("initech", bearer)


async def test_the_next_hop_sees_the_same_caller(server: Running) -> None:
    bearer = token(tenant="hooli", sub="dave", role="member")
    as_caller(bearer)
    answer = await server.tools.call(server.tools.catalog.GetTool, tool_pb2.GetToolRequest(tool_id="relay"))
    assert (answer.tool.name, answer.tool.description, answer.tool.credential) == ("hooli", "dave", bearer)
    assert [c.token for c in server.calls.seen] == [bearer, bearer]


async def test_concurrent_callers_do_not_mix(server: Running) -> None:
    async def call_as(tenant: str) -> str:
        as_caller(token(tenant=tenant))
        answer = await server.tools.call(server.tools.catalog.GetTool, tool_pb2.GetToolRequest(tool_id="who"))
        return str(answer.tool.name)

    tenants = [f"tenant-{i}" for i in range(20)]
    assert await asyncio.gather(*(asyncio.create_task(call_as(t)) for t in tenants)) == tenants


async def test_service_client_without_a_caller_is_unauthenticated(server: Running) -> None:
    with pytest.raises(Unauthenticated):
        await asyncio.create_task(
            server.tools.call(server.tools.catalog.GetTool, tool_pb2.GetToolRequest(tool_id="who")),
            context=contextvars.Context(),
        )
    assert server.calls.seen == []


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ERRORS))
async def test_domain_errors_cross_the_wire_as_themselves(server: Running, name: str) -> None:
    cls = ERRORS[name]
    as_caller(token())
    message = f"{name} happened: 'x' ü"
    with pytest.raises(AltanError) as caught:
        await server.tools.call(
            server.tools.catalog.GetTool, tool_pb2.GetToolRequest(tool_id=f"raise:{name}:{message}")
        )
    assert type(caught.value) is cls
    assert caught.value.message == message
    assert caught.value.retry_after is None

    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await raw_get_tool(server, f"raise:{name}:{message}", (("authorization", f"Bearer {token()}"),))
    assert raw.value.code() == cls.code
    assert raw.value.details() == message


async def test_a_malformed_message_is_invalid_argument_not_internal(server: Running) -> None:
    # A string field that is not UTF-8: protobuf refuses to decode it; the caller sent a bad request.
    get_tool = server.channel.unary_unary("/altan.v1.ToolService/GetTool")
    metadata = (("authorization", f"Bearer {token()}"),)
    for raw in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await get_tool(raw, metadata=metadata, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "the request is not a valid message for /altan.v1.ToolService/GetTool"
    assert server.calls.seen == []


async def test_unexpected_exception_is_internal_without_details(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await raw_get_tool(server, "boom", (("authorization", f"Bearer {token()}"),))
    assert raw.value.code() == grpc.StatusCode.INTERNAL
    assert raw.value.details() == "internal error"
    everything = (
        repr(raw.value.trailing_metadata()) + repr(raw.value.initial_metadata()) + str(raw.value.debug_error_string())
    )
    assert "Traceback" not in everything and "hunter2" not in everything

    as_caller(token())
    with pytest.raises(InternalError) as caught:
        await server.tools.call(server.tools.catalog.GetTool, tool_pb2.GetToolRequest(tool_id="boom"))
    assert caught.value.message == "internal error"
    # The trace stays in the server's own log, for operators.
    assert any(record.exc_info and "hunter2" in str(record.exc_info[1]) for record in caplog.records)


# Whole seconds, rounded up, never 0: "retry now" would invite every client back at once.
@pytest.mark.parametrize(("given", "expected"), [("3", 3), ("2.2", 3), ("0", 1)])
async def test_retry_after_reaches_the_client(server: Running, given: str, expected: int) -> None:
    as_caller(token())
    with pytest.raises(ResourceExhausted) as caught:
        await server.tools.call(server.tools.catalog.GetTool, tool_pb2.GetToolRequest(tool_id=f"slow-down:{given}"))
    assert caught.value.retry_after == expected
    assert caught.value.message == "rate limited"


async def test_streaming_rpc_is_authenticated_and_maps_errors(server: Running) -> None:
    as_caller(token(tenant="streamer"))
    events = [
        e
        async for e in server.agents.stream(
            server.agents.agents.StreamTaskEvents, agent_pb2.StreamTaskEventsRequest(task_id="t1", after_seq=0)
        )
    ]
    assert [(e.event.seq, e.event.task_id, e.event.step_id) for e in events] == [
        (1, "t1", "streamer"),
        (2, "t1", "streamer"),
        (3, "t1", "streamer"),
    ]
    got: list[int] = []
    with pytest.raises(NotFound, match="task 'gone' not found"):
        request = agent_pb2.StreamTaskEventsRequest(task_id="gone")
        async for answer in server.agents.stream(server.agents.agents.StreamTaskEvents, request):
            got.append(answer.event.seq)
    assert got == [1, 2]


async def test_client_deadline_is_enforced(server: Running) -> None:
    as_caller(token())
    unreachable = ToolClient(f"127.0.0.1:{free_port()}", 0.3)
    try:
        started = time.monotonic()
        with pytest.raises(AltanError) as caught:
            await unreachable.call(unreachable.catalog.GetTool, tool_pb2.GetToolRequest(tool_id="who"))
        assert type(caught.value) in (Unavailable, DeadlineExceeded)
        assert time.monotonic() - started < 3
        assert await unreachable.healthy(timeout=0.3) is False
    finally:
        await unreachable.aclose()


# --- health, reflection, shutdown ---------------------------------------------------------------------------------


async def test_health_reports_serving_overall_and_per_service(server: Running) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "altan.v1.ToolService", "altan.v1.AgentService"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="altan.v1.Nope"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services_without_a_token(server: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    call = stub.ServerReflectionInfo(timeout=5)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await call.read()
    await call.done_writing()
    names = {svc.name for svc in answer.list_services_response.service}
    assert {"altan.v1.ToolService", "altan.v1.AgentService", "grpc.health.v1.Health"} <= names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


async def test_stop_event_stops_the_server(server: Running) -> None:
    assert await server.tools.healthy() is True
    server.stop.set()
    await asyncio.wait_for(server.task, 10)
    assert server.task.exception() is None
    assert await server.tools.healthy(timeout=1) is False
    as_caller(token())
    with pytest.raises((Unavailable, DeadlineExceeded)):
        await server.tools.call(server.tools.catalog.GetTool, tool_pb2.GetToolRequest(tool_id="who"), timeout=1)


async def test_an_address_in_use_fails_loudly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(CannotListen) as caught:
            await asyncio.wait_for(
                serve_until_stopped(
                    [], verifier=TokenVerifier(settings()), address=address, grace_seconds=0, stop=asyncio.Event()
                ),
                10,
            )
    assert (caught.value.address, caught.value.reason) == (address, "address already in use")
    assert caught.value.line("agent service", "ALTAN_AGENT_PORT") == (
        f"the agent service cannot listen on {address}: address already in use (ALTAN_AGENT_PORT)"
    )


async def test_two_servers_never_share_a_port(server: Running) -> None:
    """grpc would let a second server bind the port too (SO_REUSEPORT) and take part of the calls."""
    with pytest.raises(CannotListen, match="address already in use"):
        await asyncio.wait_for(
            serve_until_stopped(
                [], verifier=TokenVerifier(settings()), address=server.address, grace_seconds=0, stop=asyncio.Event()
            ),
            10,
        )
    assert await server.tools.healthy() is True


async def test_client_streaming_rpcs_are_not_served_unauthenticated() -> None:
    """A handler kind the interceptor does not wrap must fail closed, not run without a verified caller."""
    ran: list[str] = []

    async def collect(requests: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext) -> bytes:
        async for _ in requests:
            pass
        ran.append("collect")
        return b"ok"

    handler = grpc.method_handlers_generic_handler(
        "altan.test.Upload", {"Collect": grpc.stream_unary_rpc_method_handler(collect)}
    )
    address = f"127.0.0.1:{free_port()}"
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve_until_stopped(
            [],
            verifier=TokenVerifier(settings()),
            address=address,
            grace_seconds=0,
            stop=stop,
            generic_handlers=[handler],
        )
    )
    client = ToolClient(address, 5)
    try:
        await wait_serving(client, task)
        upload = client.channel.stream_unary("/altan.test.Upload/Collect")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await upload(iter([b"a", b"b"]), timeout=5)
        assert caught.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)
        assert ran == []
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()


# --- tracing ------------------------------------------------------------------------------------------------------


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every span kept in memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry._state.tracer = provider.get_tracer("test")
    yield exporter
    telemetry._state.tracer = None


async def test_a_lookup_gets_no_span_and_other_rpcs_do(server: Running, exported: InMemorySpanExporter) -> None:
    """GetTool is in UNTRACED_METHODS: served in the caller's trace without a span; StreamTaskEvents has its own."""
    assert "/altan.v1.ToolService/GetTool" in UNTRACED_METHODS
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    metadata = (("authorization", f"Bearer {token()}"), ("traceparent", parent))
    await raw_get_tool(server, "who", metadata)
    stub = agent_pb2_grpc.AgentServiceStub(server.channel)
    events = stub.StreamTaskEvents(agent_pb2.StreamTaskEventsRequest(task_id="t"), metadata=metadata, timeout=5)
    assert len([e async for e in events]) == 3
    (span,) = exported.get_finished_spans()
    assert span.name == "altan.v1.AgentService/StreamTaskEvents"
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
