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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from altan import context
from altan.auth import TokenVerifier
from altan.errors import InvalidArgument, abort
from altan.health import Probe, ProbedHealthServicer
from altan.listen import CannotListen, bind_problem, split_address
from altan.tls import PeerAllowList, TlsFiles, server_credentials

__all__ = [
    "TOKENLESS_METHODS",
    "AuthInterceptor",
    "Context",
    "GrpcService",
    "ServerTls",
    "serve_until_stopped",
    "shutdown_event",
]

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    # What a servicer method receives next to its request (generic only in the type stubs).
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext

_UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# RPCs whose request carries its own proof instead of a bearer token, on every port that serves them: the browser
# coming back from an OAuth2 provider has no token, and FinishOAuth2's one-time `state` names the tenant. Their
# servicer binds the caller itself; any token sent along is ignored. A tool container's ListTools needs no caller at
# all: the Tool Service lists containers outside any request, and it describes code, not a tenant's data
# (docs/decisions.md, "Tool containers").
TOKENLESS_METHODS = frozenset({"/altan.v1.IntegratorService/FinishOAuth2", "/altan.v1.ToolContainerService/ListTools"})
_UNDECODABLE = object()


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that marks a malformed message instead of failing the call with INTERNAL."""
    if deserialize is None:  # raw bytes (the gateway's proxy)
        return None
    inner = deserialize

    def parse(data: bytes) -> Any:
        try:
            return inner(data)
        except Exception:  # DecodeError, invalid UTF-8 in a string field, ...: the caller's malformed message
            return _UNDECODABLE

    return parse


def _check_decoded(request: Any, method: str) -> None:
    if request is _UNDECODABLE:
        raise InvalidArgument(f"the request is not a valid message for {method}")


def _metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the caller of every RPC and maps domain errors to status codes."""

    def __init__(self, verifier: TokenVerifier, peers: PeerAllowList | None = None) -> None:
        self._verifier = verifier
        self._peers = peers  # with mTLS: the services allowed to call this one (altan.tls)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNAUTHENTICATED_PREFIXES):
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        tokenless = method in TOKENLESS_METHODS
        peers = self._peers

        def authenticate(authorization: str | None, ctx: Context) -> None:
            if peers is not None:
                peers.check(ctx)
            if not tokenless:
                context.bind(self._verifier.verify(authorization))

        if handler.unary_unary:
            inner: Any = handler.unary_unary

            async def unary(request: Any, ctx: Context) -> Any:
                try:
                    authenticate(_metadata_value(ctx.invocation_metadata(), "authorization"), ctx)
                    _check_decoded(request, method)
                    return await inner(request, ctx)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # mapped to a status, never leaked
                    await abort(ctx, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, ctx: Context) -> AsyncIterator[Any]:
                try:
                    authenticate(_metadata_value(ctx.invocation_metadata(), "authorization"), ctx)
                    _check_decoded(request, method)
                    async for item in inner_stream(request, ctx):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # mapped to a status, never leaked
                    await abort(ctx, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream, _tolerant(handler.request_deserializer), handler.response_serializer
            )

        # No proto has client-streaming RPCs; refuse them rather than ever serving one unauthenticated.
        async def refuse(request: Any, ctx: Context) -> Any:
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
    ready: Probe | None = None  # the service answers SERVING to health checks only while this says so


@dataclass(frozen=True)
class ServerTls:
    """mTLS on a service's port: its certificate files, and the client identities it admits (altan.tls)."""

    files: TlsFiles
    allowed_clients: tuple[str, ...] = ()


def shutdown_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C), for a graceful stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> None:
    # grpc only says that a bind failed (and logs why on stderr), so ask the system first for the reason.
    host, port = split_address(address)
    problem = bind_problem(host, port) if port else None
    if problem is None:
        try:
            if credentials is None:
                server.add_insecure_port(address)
            else:
                server.add_secure_port(address, credentials)
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
    max_message_bytes: int = 16 * 1024 * 1024,
    reflection_names: list[str] | None = None,
    reflection_pool: DescriptorPool | None = None,
    health_servicer: health.aio.HealthServicer | None = None,
    tls: ServerTls | None = None,
    health_address: str | None = None,
) -> None:
    """Serve until ``stop`` is set, then drain: report NOT_SERVING, stop with grace, return.

    ``reflection_names`` and ``reflection_pool`` say what reflection lists and describes besides ``services``
    (the gateway's public port lists the services it forwards, from a pool holding only their files);
    ``health_servicer`` replaces the default one (the gateway's answers for the services behind it).
    ``tls`` makes the port mutual TLS, admitting only its allowed clients; ``health_address`` serves the health
    checks alone in plaintext there (kubelet's gRPC probes present no certificate).
    Raises :class:`~altan.listen.CannotListen` when ``address`` cannot be bound (another server holds it).
    """
    peers = PeerAllowList(tls.allowed_clients) if tls is not None and tls.allowed_clients else None
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(verifier, peers), *(interceptors or [])],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            # Clients reconnect (and re-resolve DNS, finding new replicas) every few minutes; long event streams
            # keep their connection for up to an hour after the GOAWAY.
            ("grpc.max_connection_age_ms", 5 * 60 * 1000),
            ("grpc.max_connection_age_grace_ms", 60 * 60 * 1000),
            # Never share the port with another server (grpc's default would let a second stack bind it too).
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health_servicer or ProbedHealthServicer(
        {svc.name: svc.ready for svc in services if svc.ready is not None}
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [reflection.SERVICE_NAME, health.SERVICE_NAME, *(reflection_names or [])]
    for svc in services:
        svc.add(svc.servicer, server)
        names.append(svc.name)
    if generic_handlers:
        server.add_generic_rpc_handlers(generic_handlers)
    reflection.enable_server_reflection(names, server, pool=reflection_pool)
    _bind(server, address, server_credentials(tls.files) if tls is not None else None)
    probes = None
    if health_address is not None:
        probes = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
        _bind(probes, health_address)
    await server.start()
    if probes is not None:
        await probes.start()
    for name in ["", *(svc.name for svc in services)]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving gRPC", extra={"address": address, "services": [svc.name for svc in services]})
    await stop.wait()
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_seconds)
    if probes is not None:
        await probes.stop(0)
