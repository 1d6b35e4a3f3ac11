"""Typed gRPC clients for service-to-service calls.

One client owns one channel for the life of the process (channels are expensive; calls are cheap). Every call
forwards the caller's bearer token, so the next service verifies the same caller again, and carries a deadline.
gRPC errors come back as the same domain errors the callee raised.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from altan import context
from altan.errors import AltanError, error_from_status
from altan.v1 import agent_pb2_grpc, integrator_pb2_grpc, tool_pb2_grpc

__all__ = ["ServiceClient", "agent_client", "error_from_rpc", "integrator_client", "tool_client"]

Stub = TypeVar("Stub")

# Round robin over every address the target resolves to: with a headless Service (``dns:///name:port``) calls
# spread across all replicas; servers cap connection age so clients re-resolve and find new replicas.
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
)


def error_from_rpc(exc: grpc.aio.AioRpcError) -> AltanError:
    """The domain error a callee raised, with its ``retry-after`` and, for egress refusals, its ``target``."""
    trailers = dict(exc.trailing_metadata() or ())
    retry_after = float(trailers["retry-after"]) if "retry-after" in trailers else None
    error = error_from_status(exc.code(), exc.details() or exc.code().name, retry_after)
    if "altan-target" in trailers:
        error.target = str(trailers["altan-target"])  # type: ignore[attr-defined]
    return error


class ServiceClient(Generic[Stub]):
    """A channel to one service and the stub on it."""

    def __init__(self, target: str, stub_class: type[Stub], deadline_seconds: float) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.stub: Stub = stub_class(self.channel)  # type: ignore[call-arg]
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._deadline = deadline_seconds

    @staticmethod
    def _metadata() -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {context.current().token}"),)

    async def call(self, rpc: str, request: Any, timeout: float | None = None) -> Any:
        """Unary call as the current caller, with a deadline."""
        method = getattr(self.stub, rpc)
        try:
            return await method(request, metadata=self._metadata(), timeout=timeout or self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    async def stream(self, rpc: str, request: Any, timeout: float | None = None) -> AsyncIterator[Any]:
        """Server-streaming call as the current caller; ``timeout`` bounds the whole stream."""
        call = getattr(self.stub, rpc)(request, metadata=self._metadata(), timeout=timeout)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def healthy(self, timeout: float = 2.0) -> bool:
        """True when the service answers SERVING to a gRPC health check."""
        try:
            answer = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    async def aclose(self) -> None:
        await self.channel.close()


def agent_client(target: str, deadline: float) -> ServiceClient[agent_pb2_grpc.AgentServiceStub]:
    return ServiceClient(target, agent_pb2_grpc.AgentServiceStub, deadline)


def tool_client(target: str, deadline: float) -> ServiceClient[tool_pb2_grpc.ToolServiceStub]:
    return ServiceClient(target, tool_pb2_grpc.ToolServiceStub, deadline)


def integrator_client(target: str, deadline: float) -> ServiceClient[integrator_pb2_grpc.IntegratorServiceStub]:
    return ServiceClient(target, integrator_pb2_grpc.IntegratorServiceStub, deadline)
