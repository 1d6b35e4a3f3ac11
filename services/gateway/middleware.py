"""ASGI middleware of the public REST port: authentication and the tenant's rate, body size limit, metrics, traces.

Both are plain ASGI (no per-request objects beyond what is needed) to keep the hot path short.
"""

from __future__ import annotations

import json
import logging
import time

from opentelemetry import trace
from opentelemetry.trace import Span
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from altan import context, telemetry
from altan.auth import TokenVerifier
from altan.errors import AltanError, Unauthenticated, http_response
from altan.metrics import AUTH_FAILURES, count
from services.gateway.limits import TenantLimiter

request_log = logging.getLogger("altan.gateway.requests")

__all__ = ["AuthMiddleware", "BodyLimitMiddleware", "MetricsMiddleware", "error_response_bytes"]


def error_response_bytes(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def _send_error(send: Send, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = error_response_bytes(code, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Verifies the bearer token of every ``/v1`` request before anything else reads it (even the body).

    The verified caller is bound to the request context, which the handlers and the gRPC clients read.
    ``tokenless_paths`` take no token (the OAuth2 callback, which a browser reaches): their request proves itself.
    """

    def __init__(
        self,
        app: ASGIApp,
        verifier: TokenVerifier,
        limiter: TenantLimiter | None = None,
        tokenless_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.limiter = limiter
        self.tokenless_paths = tokenless_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or scope["path"] in self.tokenless_paths:
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            caller = self.verifier.verify(authorization)
        except Unauthenticated as exc:
            count(AUTH_FAILURES, "gateway")
            await _send_error(send, 401, "UNAUTHENTICATED", exc.message, [(b"www-authenticate", b"Bearer")])
            return
        context.bind(caller)
        telemetry.set_attributes(trace.get_current_span(), {telemetry.TENANT: caller.tenant_id})
        if self.limiter is not None:
            try:
                await self.limiter.check()
            except AltanError as exc:  # over the limit, or the state store unreachable (503)
                status, body, headers = http_response(exc)
                extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
                await _send_error(send, status, body["error"]["code"], body["error"]["message"], extra)
                return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answers 413 to a body over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await self._reject(send)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        message = f"request body larger than {self.max_bytes} bytes"
        await _send_error(send, 413, "RESOURCE_EXHAUSTED", message, [])


class MetricsMiddleware:
    """Counts requests and their latency by route template (never by raw path: ids would explode cardinality).

    Each request is also the root span of its trace (a client's ``traceparent`` is only linked, never continued:
    altan.telemetry.server_span), named by its route template once routing has found it.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "altan_http_requests", "REST requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "altan_http_request_duration_seconds", "REST request latency", ["method", "route"], registry=registry
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if not scope["path"].startswith("/v1/"):
            # Probes, /metrics and the API's description: counted, never traced (a trace every few seconds per
            # probe would bury the requests).
            try:
                await self.app(scope, receive, recording_send)
            finally:
                self._finish(scope, started, status["code"], trace.INVALID_SPAN)
            return
        traceparent = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                traceparent = value.decode("latin-1")
        with telemetry.server_span(scope["method"], traceparent, edge=True) as current:
            try:
                await self.app(scope, receive, recording_send)
            finally:
                self._finish(scope, started, status["code"], current)

    def _finish(self, scope: Scope, started: float, code: int, current: Span) -> None:
        route = _route_of(scope)
        elapsed = time.perf_counter() - started
        sample = telemetry.exemplar()
        self.requests.labels(scope["method"], route, str(code)).inc(exemplar=sample)
        self.latency.labels(scope["method"], route).observe(elapsed, exemplar=sample)
        if current.is_recording():
            current.update_name(f"{scope['method']} {route}")
            current.set_attributes(
                {"http.request.method": scope["method"], "http.route": route, "http.response.status_code": code}
            )
            if code >= 500:
                telemetry.failed(current, str(code))
        # Cloud Logging's httpRequest fields; the path only (ids, never secrets), tenant from the context. A request
        # answered as asked is a DEBUG line (Prometheus counts it already; at INFO the line was a fifth of the
        # gateway's CPU under a burst of submissions); a refusal or a failure stays INFO.
        level = logging.DEBUG if code < 400 else logging.INFO
        if not request_log.isEnabledFor(level):
            return
        request_log.log(
            level,
            "%s %s %s",
            scope["method"],
            route,
            code,
            extra={
                "httpRequest": {
                    "requestMethod": scope["method"],
                    "requestUrl": scope["path"],
                    "status": code,
                    "latency": f"{elapsed:.6f}s",
                }
            },
        )


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", "unmatched")
