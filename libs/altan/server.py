"""gRPC server bootstrap shared by every service: authentication, error mapping, health, reflection, shutdown.

Every RPC except health and reflection is authenticated here: the bearer token in the ``authorization`` metadata
is verified and its caller bound to the request context for the whole call. Domain errors become gRPC status codes
here too, so servicers stay thin and never leak a stack trace. The same wrapper opens the RPC's server span (under
the caller's ``traceparent``) and counts it (``altan_grpc_server_*``): one layer on the hot path, not three.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import Span

from altan import context, telemetry
from altan.auth import TokenVerifier
from altan.errors import InvalidArgument, Unauthenticated, abort
from altan.health import Probe, ProbedHealthServicer
from altan.listen import CannotListen, bind_problem, split_address
from altan.metrics import AUTH_FAILURES, GRPC_SERVER_HANDLED, GRPC_SERVER_SECONDS, GrpcTimer, count
from altan.tls import PeerAllowList, TlsFiles, server_credentials

__all__ = [
    "TOKENLESS_METHODS",
    "UNTRACED_METHODS",
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
# Read-only lookups a service makes on the way to its own work (a tool's definition before its call, the tool list
# before a task): no span of their own. A span costs about 50 µs to build and export, and these would be a third of
# a task's spans (docs/benchmarks.md, "Tracing"); their time is in the caller's span and in
# altan_grpc_server_handling_seconds, and the trace context passes through them, so what they call and log stays in
# the trace.
UNTRACED_METHODS = frozenset(
    {
        "/altan.v1.ToolService/GetTool",
        "/altan.v1.ToolService/ListTools",
        "/altan.v1.IntegratorRuntimeService/DescribeTools",
    }
)
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


# Metadata the wrapper reads: the caller's token, its trace context, and the task it works on (a label for spans and
# logs, sent by altan.clients; the public port never forwards it from a client).
_WANTED = frozenset({"authorization", "traceparent", "altan-task-id"})
# Server spans that fail by the server's fault (OpenTelemetry's gRPC conventions); a caller's error is not one.
_SERVER_FAULTS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


def _metadata_values(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in metadata or ():
        if name in _WANTED and name not in found:
            found[name] = value if isinstance(value, str) else value.decode()
    return found


def _code_name(ctx: Context) -> str:
    code = ctx.code()
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the caller of every RPC and maps domain errors to status codes; traces and counts each RPC.

    ``service`` names this process in ``altan_auth_failures_total``; ``edge`` (the gateway's public port) starts
    a new trace for each call instead of continuing the client's (altan.telemetry.server_span).
    """

    def __init__(
        self, verifier: TokenVerifier, peers: PeerAllowList | None = None, *, service: str = "", edge: bool = False
    ) -> None:
        self._verifier = verifier
        self._peers = peers  # with mTLS: the services allowed to call this one (altan.tls)
        self._service = service or "unknown"
        self._edge = edge
        self._timers: dict[str, GrpcTimer] = {}
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}  # method -> (its handler, wrapped)

    def _timer(self, method: str, kind: str) -> GrpcTimer:
        timer = self._timers.get(method)
        if timer is None:
            timer = self._timers[method] = GrpcTimer(GRPC_SERVER_HANDLED, GRPC_SERVER_SECONDS, method, kind)
        return timer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNAUTHENTICATED_PREFIXES):
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        # The wrapped handler of a method is made once: a servicer answers the same handler for every call of it.
        made = self._wrapped.get(method)
        if made is not None and made[0] is handler:
            return made[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        tokenless = method in TOKENLESS_METHODS
        timer = self._timer(method, "server_stream" if handler.unary_stream else "unary")
        edge = self._edge
        record = method not in UNTRACED_METHODS
        span_name = method[1:]
        # rpc.service and rpc.method are in the span's name already: each attribute costs its encoding on export.
        span_attributes = {"rpc.system": "grpc"}

        peers = self._peers

        def authenticate(metadata: dict[str, str], current: Span, ctx: Context) -> None:
            if peers is not None:
                peers.check(ctx)
            if not tokenless:
                try:
                    caller = self._verifier.verify(metadata.get("authorization"))
                except Unauthenticated:
                    count(AUTH_FAILURES, self._service)
                    raise
                task_id = "" if edge else metadata.get("altan-task-id", "")
                if task_id:
                    caller = replace(caller, task_id=task_id)
                context.bind(caller)
                if current.is_recording():
                    current.set_attribute(telemetry.TENANT, caller.tenant_id)
                    if task_id:
                        current.set_attribute(telemetry.TASK, task_id)

        def finish(current: Span, ctx: Context, started: float) -> None:
            code = _code_name(ctx)
            timer.observe(started, code)
            if log.isEnabledFor(logging.DEBUG):  # one line per RPC, with its trace id (altan.logging)
                log.debug("served %s %s", method, code, extra={"latency_s": round(time.perf_counter() - started, 6)})
            if current.is_recording():
                current.set_attribute("rpc.grpc.status_code", ctx.code().value[0] if code != "OK" else 0)
                if code in _SERVER_FAULTS:
                    telemetry.failed(current, code)

        if handler.unary_unary:
            inner: Any = handler.unary_unary

            async def unary(request: Any, ctx: Context) -> Any:
                started = time.perf_counter()
                metadata = _metadata_values(ctx.invocation_metadata())
                with telemetry.server_span(
                    span_name,
                    metadata.get("traceparent"),
                    edge=edge,
                    attributes=span_attributes,
                    record=record,
                ) as current:
                    try:
                        authenticate(metadata, current, ctx)
                        _check_decoded(request, method)
                        return await inner(request, ctx)
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:  # mapped to a status, never leaked
                        await abort(ctx, exc)
                    finally:
                        finish(current, ctx, started)

            return grpc.unary_unary_rpc_method_handler(
                unary, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, ctx: Context) -> AsyncIterator[Any]:
                started = time.perf_counter()
                metadata = _metadata_values(ctx.invocation_metadata())
                with telemetry.server_span(
                    span_name,
                    metadata.get("traceparent"),
                    edge=edge,
                    attributes=span_attributes,
                    record=record,
                ) as current:
                    try:
                        authenticate(metadata, current, ctx)
                        _check_decoded(request, method)
                        async for item in inner_stream(request, ctx):
                            yield item
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:  # mapped to a status, never leaked
                        await abort(ctx, exc)
                    finally:
                        finish(current, ctx, started)

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
    service: str = "",
    edge: bool = False,
) -> None:
    """Serve until ``stop`` is set, then drain: report NOT_SERVING, stop with grace, return.

    ``reflection_names`` and ``reflection_pool`` say what reflection lists and describes besides ``services``
    (the gateway's public port lists the services it forwards, from a pool holding only their files);
    ``health_servicer`` replaces the default one (the gateway's answers for the services behind it).
    ``tls`` makes the port mutual TLS, admitting only its allowed clients; ``health_address`` serves the health
    checks alone in plaintext there (kubelet's gRPC probes present no certificate). ``service`` and ``edge`` are the
    :class:`AuthInterceptor`'s.
    Raises :class:`~altan.listen.CannotListen` when ``address`` cannot be bound (another server holds it).
    """
    peers = PeerAllowList(tls.allowed_clients) if tls is not None and tls.allowed_clients else None
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(verifier, peers, service=service, edge=edge), *(interceptors or [])],
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
