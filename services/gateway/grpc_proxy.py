"""The gateway's public gRPC port: the services' public RPCs, forwarded as raw bytes.

Messages are not decoded here (the services own them); the caller's token is verified by the server's
AuthInterceptor and forwarded. Internal-only RPCs (ToolService.ExecuteTool, which carries a credential) are not
exposed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from altan import context
from altan.clients import ServiceClient, error_from_rpc
from altan.v1 import agent_pb2, integrator_pb2, tool_pb2

__all__ = ["PUBLIC_SERVICES", "PublicProxy"]

_INTERNAL_ONLY = frozenset({"/altan.v1.ToolService/ExecuteTool"})
PUBLIC_SERVICES = ("altan.v1.AgentService", "altan.v1.ToolService", "altan.v1.IntegratorService")


def _methods() -> dict[str, tuple[str, bool]]:
    """Public method path -> (service name, server-streaming)."""
    found: dict[str, tuple[str, bool]] = {}
    for module in (agent_pb2, tool_pb2, integrator_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if path not in _INTERNAL_ONLY:
                    found[path] = (service.full_name, method.server_streaming)
    return found


class PublicProxy(grpc.GenericRpcHandler):
    """Forwards public RPCs to the service that owns them."""

    def __init__(self, clients: dict[str, ServiceClient[Any]]) -> None:
        self._channels = {name: client.channel for name, client in clients.items()}
        self._methods = _methods()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        route = self._methods.get(details.method)
        if route is None:
            return None
        channel = self._channels[route[0]]
        path = details.method
        if route[1]:
            return grpc.unary_stream_rpc_method_handler(self._streaming(channel, path))
        return grpc.unary_unary_rpc_method_handler(self._unary(channel, path))

    @staticmethod
    def _metadata() -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {context.current().token}"),)

    def _unary(self, channel: grpc.aio.Channel, path: str) -> Any:
        call = channel.unary_unary(path)

        async def forward(request: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
            try:
                return await call(request, metadata=self._metadata(), timeout=ctx.time_remaining() or 30)  # type: ignore[no-any-return]
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc) from None

        return forward

    def _streaming(self, channel: grpc.aio.Channel, path: str) -> Any:
        call = channel.unary_stream(path)

        async def forward(request: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            stream = call(request, metadata=self._metadata(), timeout=ctx.time_remaining())
            try:
                async for item in stream:
                    yield item
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc) from None
            finally:
                stream.cancel()

        return forward
