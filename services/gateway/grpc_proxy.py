"""The gateway's public gRPC port: the services' public RPCs, forwarded as raw bytes.

Only the methods in :data:`PUBLIC_METHODS` are served: a new RPC is private until it is listed here. Messages are
not decoded (the owning service decodes and validates them, exactly as for REST); the caller's token is verified
by the server's AuthInterceptor and forwarded. Reflection describes the public services from a descriptor pool that
holds only their files, and the health service answers for each of them by asking the service behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2

from altan.clients import ServiceChannel, call_metadata
from altan.errors import from_rpc_error
from altan.server import TOKENLESS_METHODS, Context
from altan.v1 import agent_pb2, integrator_pb2, tool_pb2
from services.gateway.limits import TenantLimiter

__all__ = ["PUBLIC_METHODS", "PUBLIC_SERVICES", "PublicHealth", "PublicProxy", "public_descriptor_pool"]

# Every RPC a tenant may call on the public port. Anything else (the internal runtime services, a new RPC not
# yet decided on) answers UNIMPLEMENTED.
PUBLIC_METHODS = frozenset(
    {
        "/altan.v1.AgentService/CreateAgent",
        "/altan.v1.AgentService/GetAgent",
        "/altan.v1.AgentService/ListAgents",
        "/altan.v1.AgentService/UpdateAgent",
        "/altan.v1.AgentService/DeleteAgent",
        "/altan.v1.AgentService/SubmitTask",
        "/altan.v1.AgentService/GetTask",
        "/altan.v1.AgentService/StreamTaskEvents",
        "/altan.v1.AgentService/CancelTask",
        "/altan.v1.AgentService/DecideApproval",
        "/altan.v1.AgentService/GetThread",
        "/altan.v1.ToolService/ListTools",
        "/altan.v1.ToolService/GetTool",
        "/altan.v1.ToolService/CreateTool",
        "/altan.v1.ToolService/DeleteTool",
        "/altan.v1.ToolService/GetMcpServer",
        "/altan.v1.ToolService/ListMcpServers",
        "/altan.v1.ToolService/DeleteMcpServer",
        "/altan.v1.IntegratorService/PutCredential",
        "/altan.v1.IntegratorService/GetCredential",
        "/altan.v1.IntegratorService/ListCredentials",
        "/altan.v1.IntegratorService/DeleteCredential",
        "/altan.v1.IntegratorService/AuthorizeCredential",
        "/altan.v1.IntegratorService/FinishOAuth2",
        "/altan.v1.IntegratorService/InvokeTool",
        "/altan.v1.IntegratorService/PutMcpServer",
        "/altan.v1.IntegratorService/ListAuditEvents",
    }
)
PUBLIC_SERVICES = ("altan.v1.AgentService", "altan.v1.ToolService", "altan.v1.IntegratorService")
_PUBLIC_FILES = (agent_pb2.DESCRIPTOR, tool_pb2.DESCRIPTOR, integrator_pb2.DESCRIPTOR)


def _streaming() -> dict[str, bool]:
    """Public method path -> whether it streams its responses."""
    found: dict[str, bool] = {}
    for file in _PUBLIC_FILES:
        for service in file.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if path in PUBLIC_METHODS:
                    found[path] = method.server_streaming
    return found


def public_descriptor_pool() -> descriptor_pool.DescriptorPool:
    """A pool with the public files and what they import, and nothing internal, for reflection."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb))
        added.add(file.name)

    for file in _PUBLIC_FILES:
        add(file)
    return pool


def _metadata() -> tuple[tuple[str, str], ...]:
    # A tokenless RPC (altan.server.TOKENLESS_METHODS) has no caller here: it is forwarded without a token. The
    # trace context is the gateway's own span (the client's was not trusted), and no task label is forwarded.
    return call_metadata(with_task=False)


class PublicProxy(grpc.GenericRpcHandler):
    """Forwards public RPCs to the service that owns them, each first within the tenant's request rate."""

    def __init__(self, backends: dict[str, ServiceChannel], limiter: TenantLimiter | None = None) -> None:
        self._channels = {name: client.channel for name, client in backends.items()}
        self._streaming = _streaming()
        self._limiter = limiter
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path: str = details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(path)
        if handler is None and path in self._streaming:
            # Made once per method: gRPC asks for the handler on every call.
            handler = self._handlers[path] = self._handler(path)
        return handler

    def _handler(self, path: str) -> grpc.RpcMethodHandler:
        streaming = self._streaming[path]
        channel = self._channels[path.split("/")[1]]
        # A tokenless RPC has no tenant yet to count it against (its state names one only in the integrator).
        limiter = None if path in TOKENLESS_METHODS else self._limiter
        if streaming:
            return grpc.unary_stream_rpc_method_handler(self._stream(channel, path, limiter))
        return grpc.unary_unary_rpc_method_handler(self._unary(channel, path, limiter))

    @staticmethod
    def _unary(channel: grpc.aio.Channel, path: str, limiter: TenantLimiter | None) -> Any:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)

        async def forward(request: bytes, ctx: Context) -> bytes:
            if limiter is not None:
                await limiter.check()
            try:
                return await call(request, metadata=_metadata(), timeout=ctx.time_remaining() or 30)  # type: ignore[no-any-return]
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None

        return forward

    @staticmethod
    def _stream(channel: grpc.aio.Channel, path: str, limiter: TenantLimiter | None) -> Any:
        call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)

        async def forward(request: bytes, ctx: Context) -> AsyncIterator[bytes]:
            if limiter is not None:
                await limiter.check()
            stream = call(request, metadata=_metadata(), timeout=ctx.time_remaining())
            try:
                async for item in stream:
                    yield item
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
            finally:
                stream.cancel()

        return forward


class PublicHealth(health.aio.HealthServicer):
    """Health of the public port: ``""`` is the gateway itself; each public service is asked of its owner."""

    def __init__(self, backends: dict[str, ServiceChannel]) -> None:
        super().__init__()
        self._backends = backends

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Context) -> health_pb2.HealthCheckResponse:
        backend = self._backends.get(request.service)
        if backend is None:
            return await super().Check(request, context)  # type: ignore[no-any-return]
        serving = await backend.healthy(request.service, timeout=min(context.time_remaining() or 2.0, 2.0))
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
