"""Prometheus metrics shared by every service, in one process-wide registry served on its metrics port.

No label takes a value a tenant controls: services and methods are the protos' own names, tool kinds and outcomes
are fixed sets, models are the operator's allow-list (``ALTAN_METRICS_MODELS``) or ``other``. Counters and
histograms carry an exemplar naming the sampled trace they were counted in (OpenMetrics only: ask with
``Accept: application/openmetrics-text``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from threading import Thread
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from altan.telemetry import exemplar

__all__ = [
    "AUTH_FAILURES",
    "CREDENTIALS_NEEDS_REAUTH",
    "CREDENTIAL_REFRESHES",
    "EGRESS_REFUSED",
    "GRPC_CLIENT_HANDLED",
    "GRPC_CLIENT_SECONDS",
    "GRPC_SERVER_HANDLED",
    "GRPC_SERVER_SECONDS",
    "RATE_LIMITED",
    "REGISTRY",
    "TASK_QUEUE_DEPTH",
    "TOOL_CALLS",
    "TOOL_CALL_SECONDS",
    "GrpcTimer",
    "count",
    "encode",
    "grpc_code",
    "serve_metrics",
    "set_task_queue_depth",
    "shared_collector",
]

# One registry per process for what libs/altan and the services count; the gateway also serves its REST metrics.
REGISTRY = CollectorRegistry()

# Latency buckets of internal calls: sub-millisecond hops up to a long tool call or model turn.
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# The labels of the gRPC metrics are grpc-ecosystem's (go-grpc-prometheus, py-grpc-prometheus): grpc_service,
# grpc_method, grpc_type (unary, server_stream) and grpc_code as Go names it (OK, InvalidArgument, Internal, ...), so
# that dashboards and alerts written for those read these too.
_GRPC_LABELS = ["grpc_service", "grpc_method", "grpc_type"]

GRPC_SERVER_HANDLED = Counter(
    "altan_grpc_server_handled",
    "RPCs served, by full service name, method, type and status code",
    [*_GRPC_LABELS, "grpc_code"],
    registry=REGISTRY,
)
GRPC_SERVER_SECONDS = Histogram(
    "altan_grpc_server_handling_seconds",
    "Time to serve an RPC (a stream: its whole life)",
    _GRPC_LABELS,
    registry=REGISTRY,
    buckets=_RPC_BUCKETS,
)
GRPC_CLIENT_HANDLED = Counter(
    "altan_grpc_client_handled",
    "Unary RPCs this process made to another service, by status code",
    [*_GRPC_LABELS, "grpc_code"],
    registry=REGISTRY,
)
GRPC_CLIENT_SECONDS = Histogram(
    "altan_grpc_client_handling_seconds",
    "Time a unary RPC to another service took, as its caller saw it",
    _GRPC_LABELS,
    registry=REGISTRY,
    buckets=_RPC_BUCKETS,
)
TOOL_CALLS = Counter(
    "altan_tool_calls",
    "Tool calls through the integrator (each once, whatever its retries), by kind and outcome",
    ["kind", "outcome"],
    registry=REGISTRY,
)
TOOL_CALL_SECONDS = Histogram(
    "altan_tool_call_duration_seconds",
    "One tool call through the integrator, retries and waits included",
    ["kind"],
    registry=REGISTRY,
    buckets=_RPC_BUCKETS,
)
RATE_LIMITED = Counter(
    "altan_rate_limited",
    "Requests or tool calls refused (429) by a rate limit: scope tenant (the gateway's) or tool",
    ["scope"],
    registry=REGISTRY,
)
EGRESS_REFUSED = Counter(
    "altan_egress_refused", "Outbound calls the egress guard refused (a destination not allowed)", registry=REGISTRY
)
AUTH_FAILURES = Counter(
    "altan_auth_failures",
    "Requests refused as unauthenticated (no, bad or expired token), by the service that refused them",
    ["service"],
    registry=REGISTRY,
)
CREDENTIAL_REFRESHES = Counter(
    "altan_credential_refresh",
    "OAuth2 access token refreshes: ok, refused (the credential now needs re-authorization) or error",
    ["outcome"],
    registry=REGISTRY,
)
CREDENTIALS_NEEDS_REAUTH = Gauge(
    "altan_credentials_needs_reauth",
    "Credentials this replica saw refused a refresh and not re-authorized since (its own view since it started)",
    registry=REGISTRY,
)
TASK_QUEUE_DEPTH = Gauge(
    "altan_task_queue_depth", "Tasks accepted and waiting for a worker (set by the task queue)", registry=REGISTRY
)


def set_task_queue_depth(depth: int) -> None:
    """The task queue reports how many accepted tasks wait for a worker (0 until a queue reports)."""
    TASK_QUEUE_DEPTH.set(depth)


def count(counter: Counter, *labels: str) -> None:
    """One more, with the current trace as exemplar when it is sampled."""
    child = counter.labels(*labels) if labels else counter
    child.inc(exemplar=exemplar())


def _split(path: str) -> tuple[str, str]:
    # "/altan.v1.AgentService/SubmitTask" -> ("altan.v1.AgentService", "SubmitTask")
    _, service, method = [*path.split("/"), "", ""][:3]
    return service or "unknown", method or "unknown"


def grpc_code(name: str) -> str:
    """A status code as grpc-ecosystem's metrics name it: ``DEADLINE_EXCEEDED`` -> ``DeadlineExceeded``."""
    if name == "OK":
        return "OK"
    if name == "CANCELLED":
        return "Canceled"  # Go's spelling
    return "".join(part.capitalize() for part in name.split("_"))


class GrpcTimer:
    """The server or client metrics of one method, with its children looked up once (labels() takes a lock)."""

    def __init__(self, handled: Counter, seconds: Histogram, path: str, kind: str = "unary") -> None:
        self._labels = (*_split(path), kind)
        self._handled = handled
        self._codes: dict[str, Any] = {}
        self._seconds = seconds.labels(*self._labels)

    def observe(self, started: float, code: str) -> None:
        """Count one call that started at ``started`` (``time.perf_counter()``) and ended with ``code`` (the
        ``grpc.StatusCode`` name, e.g. ``NOT_FOUND``)."""
        self._seconds.observe(time.perf_counter() - started, exemplar=exemplar())
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._handled.labels(*self._labels, grpc_code(code))
        child.inc()  # the histogram's exemplar names the trace already: one validation fewer per RPC


class _Shared(Collector):
    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def shared_collector() -> Collector:
    """The shared metrics as one collector, to serve them from another registry too (the gateway's)."""
    return _Shared()


def encode(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry in the format the scraper asked for (OpenMetrics carries exemplars); body and content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def serve_metrics(port: int, host: str, registry: CollectorRegistry = REGISTRY) -> AbstractContextManager[None]:
    """Serve ``registry`` on ``host:port`` (``/metrics``, text or OpenMetrics) until the returned context exits."""
    server, thread = start_http_server(port, host, registry)
    return _Serving(server, thread)


class _Serving(AbstractContextManager[None]):
    def __init__(self, server: Any, thread: Thread) -> None:
        self._server = server
        self._thread = thread

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
