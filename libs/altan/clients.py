"""Typed gRPC clients for service-to-service calls.

One :class:`ServiceChannel` owns the channel to one service for the life of the process (channels are expensive;
calls are cheap), and the typed stubs of that service are built on it. Calls go through :meth:`ServiceChannel.call`
with the stub's method itself (``await tools.call(tools.catalog.GetTool, request)``), so mypy checks the request and
response types across the wire. Every call forwards the caller's bearer token, so the next service verifies the same
caller again, and carries a deadline and the current trace context (``traceparent``); gRPC errors come back as the
domain errors the callee raised. Unary calls are timed in ``altan_grpc_client_handling_seconds``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from altan import context, telemetry
from altan.errors import from_rpc_error
from altan.metrics import GRPC_CLIENT_HANDLED, GRPC_CLIENT_SECONDS, GrpcTimer
from altan.tls import TlsFiles, secure_channel
from altan.v1 import (
    agent_pb2_grpc,
    container_pb2,
    container_pb2_grpc,
    integrator_pb2_grpc,
    runtime_pb2_grpc,
    tool_pb2,
    tool_pb2_grpc,
)

__all__ = [
    "AgentClient",
    "IntegratorClient",
    "ServiceChannel",
    "ToolClient",
    "ToolContainerClient",
    "call_metadata",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Round robin over every address the target resolves to: with a headless Service (``dns:///name:port``) calls
# spread across all replicas; servers cap connection age so clients re-resolve and find new replicas.
# A service that went away (restarted by `altan up` or Kubernetes) is tried again within a second or two of
# coming back: gRPC's default reconnect backoff reaches two minutes.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
)


def call_metadata(*, with_task: bool = True) -> tuple[tuple[str, str], ...]:
    """The metadata of a call as the current caller: its token, the trace context, and (``with_task``) its task."""
    # No caller (a tokenless RPC such as FinishOAuth2): no token, and any other RPC answers UNAUTHENTICATED.
    caller = context.current_or_none()
    carrier: dict[str, str] = {}
    telemetry.inject(carrier)
    if caller is not None:
        if caller.token:
            carrier["authorization"] = f"Bearer {caller.token}"
        if with_task and caller.task_id:
            carrier["altan-task-id"] = caller.task_id
    return tuple(carrier.items())


def _method_path(method: Any) -> str:
    # The stub's multicallable knows its path ("/altan.v1.ToolService/GetTool") only in a private attribute.
    path = getattr(method, "_method", b"")
    return path.decode() if isinstance(path, bytes) else str(path or "")


class ServiceChannel:
    """A channel to one service; subclasses add that service's typed stubs."""

    def __init__(
        self,
        target: str,
        deadline_seconds: float,
        options: tuple[tuple[str, int | str], ...] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        self.target = target
        # With mTLS (altan.tls), the channel presents this process's certificate and follows its rotations.
        every = (*_CHANNEL_OPTIONS, *options)
        if tls is None:
            self.channel = grpc.aio.insecure_channel(target, options=every)
        else:
            self.channel = secure_channel(target, tls, every)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._deadline = deadline_seconds
        self._timers: dict[int, GrpcTimer] = {}

    def _timer(self, method: Any) -> GrpcTimer:
        timer = self._timers.get(id(method))
        if timer is None:  # stubs live as long as the channel: one timer per multicallable
            timer = GrpcTimer(GRPC_CLIENT_HANDLED, GRPC_CLIENT_SECONDS, _method_path(method))
            self._timers[id(method)] = timer
        return timer

    async def call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, *, timeout: float | None = None
    ) -> Resp:
        """Unary call as the current caller, with a deadline."""
        timer = self._timer(method)
        started = time.perf_counter()
        try:
            answer = await method(request, metadata=call_metadata(), timeout=timeout or self._deadline)
        except grpc.aio.AioRpcError as exc:
            timer.observe(started, exc.code().name)
            raise from_rpc_error(exc) from None
        timer.observe(started, "OK")
        return answer

    async def stream(
        self, method: grpc.aio.UnaryStreamMultiCallable[Req, Resp], request: Req, *, timeout: float | None = None
    ) -> AsyncIterator[Resp]:
        """Server-streaming call as the current caller; ``timeout`` bounds the whole stream."""
        call = method(request, metadata=call_metadata(), timeout=timeout)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def healthy(self, service: str = "", timeout: float = 2.0) -> bool:
        """True when the service answers SERVING to a gRPC health check."""
        try:
            answer = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    async def aclose(self) -> None:
        await self.channel.close()


class AgentClient(ServiceChannel):
    """The Agent Service: agents, tasks and their events."""

    def __init__(self, target: str, deadline_seconds: float, tls: TlsFiles | None = None) -> None:
        super().__init__(target, deadline_seconds, tls=tls)
        self.agents = agent_pb2_grpc.AgentServiceStub(self.channel)


class ToolClient(ServiceChannel):
    """The Tool Service: the public catalogue and the internal executor."""

    def __init__(self, target: str, deadline_seconds: float, tls: TlsFiles | None = None) -> None:
        super().__init__(target, deadline_seconds, tls=tls)
        self.catalog = tool_pb2_grpc.ToolServiceStub(self.channel)
        self.runtime = runtime_pb2_grpc.ToolRuntimeServiceStub(self.channel)


class IntegratorClient(ServiceChannel):
    """The Integrator Engine: credentials, tool calls, audit; and the runtime calls of tasks."""

    def __init__(self, target: str, deadline_seconds: float, tls: TlsFiles | None = None) -> None:
        super().__init__(target, deadline_seconds, tls=tls)
        self.integrator = integrator_pb2_grpc.IntegratorServiceStub(self.channel)
        self.runtime = runtime_pb2_grpc.IntegratorRuntimeServiceStub(self.channel)


class ToolContainerClient(ServiceChannel):
    """A tool container (``altan serve-tools``): its tool list, and calls as the current caller."""

    # A container that went away is tried again within a second or two of coming back, as every service channel
    # is (``_CHANNEL_OPTIONS``), so that its tools recover as soon as it does.
    def __init__(self, target: str, deadline_seconds: float) -> None:
        super().__init__(target, deadline_seconds)
        self.container = container_pb2_grpc.ToolContainerServiceStub(self.channel)

    async def list_tools(self, timeout: float) -> list[tool_pb2.Tool]:
        """The container's tools. Needs no caller: the Tool Service lists containers outside any request."""
        try:
            answer = await self.container.ListTools(container_pb2.ListContainerToolsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return list(answer.tools)
