"""gRPC server bootstrap shared by every service: authentication, error mapping, health, reflection, shutdown.

Every RPC except health and reflection is authenticated here: the bearer token in the ``authorization`` metadata
is verified and its caller bound to the request context for the whole call. Domain errors become gRPC status codes
here too, so servicers stay thin and never leak a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from altan import context
from altan.auth import TokenVerifier
from altan.errors import AltanError
from altan.health import Probe, ProbedHealthServicer
from altan.listen import CannotListen, bind_problem, split_address

__all__ = ["AuthInterceptor", "GrpcService", "serve_until_stopped", "shutdown_event"]

log = logging.getLogger(__name__)

_UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode()
    return None


async def _abort(ctx: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, AltanError):
        trailers = []
        if exc.retry_after is not None:
            trailers.append(("retry-after", str(int(exc.retry_after + 0.999))))
        if getattr(exc, "target", ""):
            trailers.append(("altan-target", exc.target))  # type: ignore[attr-defined]
        if trailers:
            ctx.set_trailing_metadata(tuple(trailers))
        await ctx.abort(exc.code, exc.message)
    log.error("unhandled error in RPC", exc_info=exc)
    await ctx.abort(grpc.StatusCode.INTERNAL, "internal error")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the caller of every RPC and maps domain errors to status codes."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNAUTHENTICATED_PREFIXES):
            return handler
        verify = self._verifier.verify

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
                try:
                    context.bind(verify(_metadata_value(ctx.invocation_metadata(), "authorization")))
                    return await inner(request, ctx)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # mapped to a status, never leaked
                    await _abort(ctx, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request: Any, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    context.bind(verify(_metadata_value(ctx.invocation_metadata(), "authorization")))
                    async for item in inner_stream(request, ctx):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # mapped to a status, never leaked
                    await _abort(ctx, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )

        # No proto has client-streaming RPCs; refuse them rather than ever serving one unauthenticated.
        async def refuse(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
            await ctx.abort(grpc.StatusCode.UNIMPLEMENTED, "client-streaming RPCs are not supported")

        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                refuse, handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


@dataclass
class GrpcService:
    """One servicer to mount: its ``add_*_to_server`` function, the servicer and its full service name.

    ``ready`` is what the service needs to answer (its state backend's ping): while it fails, the service's health
    check answers NOT_SERVING.
    """

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    name: str
    extra_names: list[str] = field(default_factory=list)
    ready: Probe | None = None


def shutdown_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C), for a graceful stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _bind(server: grpc.aio.Server, address: str) -> None:
    # grpc only says that a bind failed (and logs why on stderr), so ask the system first for the reason.
    host, port = split_address(address)
    problem = bind_problem(host, port) if port else None
    if problem is None:
        try:
            server.add_insecure_port(address)
            return
        except RuntimeError:  # lost a race for the port since the probe
            problem = bind_problem(host, port) or "cannot bind"
    raise CannotListen(address, problem)


async def serve_until_stopped(
    services: list[GrpcService],
    *,
    verifier: TokenVerifier,
    address: str,
    grace_seconds: float,
    stop: asyncio.Event,
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
    generic_handlers: list[grpc.GenericRpcHandler] | None = None,
) -> None:
    """Serve until ``stop`` is set, then drain: report NOT_SERVING, stop with grace, return.

    Raises :class:`~altan.listen.CannotListen` when ``address`` cannot be bound (another server holds it).
    """
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(verifier), *(interceptors or [])],
        options=[
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            # Clients reconnect (and re-resolve DNS, finding new replicas) every few minutes; long event streams
            # keep their connection for up to an hour after the GOAWAY.
            ("grpc.max_connection_age_ms", 5 * 60 * 1000),
            ("grpc.max_connection_age_grace_ms", 60 * 60 * 1000),
            # Never share the port with another server (grpc's default would let a second stack bind it too).
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = ProbedHealthServicer({svc.name: svc.ready for svc in services if svc.ready is not None})
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [reflection.SERVICE_NAME, health.SERVICE_NAME]
    for svc in services:
        svc.add(svc.servicer, server)
        names.append(svc.name)
    if generic_handlers:
        server.add_generic_rpc_handlers(generic_handlers)
    reflection.enable_server_reflection(names, server)
    _bind(server, address)
    await server.start()
    for name in ["", *(svc.name for svc in services)]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving gRPC", extra={"address": address, "services": [svc.name for svc in services]})
    await stop.wait()
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_seconds)
