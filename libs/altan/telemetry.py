"""OpenTelemetry traces of every service, configured by the standard ``OTEL_*`` variables.

One request is one trace: the gateway starts it (REST or public gRPC), each internal gRPC hop carries it in the
``traceparent`` metadata (W3C Trace Context) and opens a server span under it, and LLM and outbound HTTP calls add
client spans. A third party never sees the ``traceparent`` unless ``ALTAN_TRACE_PROPAGATE_OUTBOUND`` says so.

Tracing is off unless ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``) or an OTLP endpoint is set. Off, no span is
ever built: the edge draws a random W3C trace id, the hops pass it on, and logs and tasks carry it, so a user can
still hand a task's ``trace_id`` to an operator who finds its log lines. On, spans are sampled by
``OTEL_TRACES_SAMPLER`` (the SDK's default, parent-based always-on) and exported in batches (``OTEL_BSP_*``).

Spans carry the tenant (``altan.tenant_id``) and the task (``altan.task_id``), never a secret, an argument, a
prompt or a completion: attributes are set here and in the call sites by name, never from a payload.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import Token
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "TASK",
    "TENANT",
    "SpanKind",
    "TracingSetup",
    "configure_tracing",
    "current_trace_id",
    "enabled",
    "exemplar",
    "failed",
    "inject",
    "log_fields",
    "outbound_headers",
    "resumed",
    "server_span",
    "set_attributes",
    "span",
    "traceparent",
]

TENANT = "altan.tenant_id"
TASK = "altan.task_id"
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_EMPTY = otel_context.Context()
_EXPORTERS = frozenset({"otlp", "console"})


@dataclass
class _State:
    tracer: trace.Tracer | None = None  # None: tracing off, no span is ever built
    propagate_outbound: bool = False


_state = _State()


@dataclass
class TracingSetup:
    """What :func:`configure_tracing` turned on; :meth:`shutdown` flushes the spans still queued."""

    enabled: bool
    exporters: tuple[str, ...] = ()
    _provider: object | None = None

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # type: ignore[attr-defined]


def _exporters(environ: Mapping[str, str]) -> tuple[str, ...]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    names = tuple(n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip())
    if not names and (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ("otlp",)  # an endpoint alone (what an OpenTelemetry Operator injects) means "export there"
    unknown = set(names) - _EXPORTERS - {"none"}
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter(s) {sorted(unknown)} (otlp, console, none)")
    return tuple(n for n in names if n != "none")


def configure_tracing(
    service: str, *, propagate_outbound: bool = False, environ: Mapping[str, str] | None = None
) -> TracingSetup:
    """Set this process's tracing from the ``OTEL_*`` variables; call once, from ``main``.

    ``service`` becomes ``service.name`` (``altan-<service>``): the four processes of ``altan up`` share one
    environment, so ``OTEL_SERVICE_NAME`` cannot name them; ``OTEL_RESOURCE_ATTRIBUTES`` adds to every one.
    Raises ``ValueError`` for an exporter or protocol this build does not have.
    """
    env = os.environ if environ is None else environ
    _state.propagate_outbound = propagate_outbound
    exporters = _exporters(env)
    if not exporters:
        _state.tracer = None
        return TracingSetup(enabled=False)
    # Imported only when on: the SDK and the exporters cost start-up time a process with tracing off never pays.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": f"altan-{service}"}))
    for name in exporters:
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
        else:
            exporter = _otlp_exporter(env)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _state.tracer = provider.get_tracer("altan")
    return TracingSetup(enabled=True, exporters=exporters, _provider=provider)


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r} (grpc, http/protobuf)")


def enabled() -> bool:
    """True when spans are built and exported."""
    return _state.tracer is not None


def _parse_traceparent(value: str) -> SpanContext | None:
    """A W3C ``traceparent`` (version 00) as a remote span context; None when malformed.

    Written here rather than through TraceContextTextMapPropagator.extract, which took 42 µs a call (measured
    here): a span's whole budget, on every hop. Only version 00 is read (what every hop of the install sends);
    ``tracestate`` is neither read nor sent, as no vendor of ours writes one.
    """
    found = _TRACEPARENT.fullmatch(value)
    if found is None:
        return None
    trace_id, span_id = int(found[1], 16), int(found[2], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(found[3], 16) & 1))


def traceparent() -> str | None:
    """The current span as a W3C ``traceparent`` header value; None outside any request."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def _random_context() -> SpanContext:
    # The W3C format: 128-bit trace id, 64-bit span id, never zero; not sampled, as nothing records it.
    return SpanContext(
        trace_id=random.getrandbits(128) or 1,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )


def _detach(token: Token[Context]) -> None:
    """Make current again what was before ``token``'s attach. A served stream may be closed (its client went away)
    from another context than the one that iterated it: there nothing of ours is current, so there is nothing to
    undo, and it is no error (``otel_context.detach`` would log it with a traceback)."""
    with contextlib.suppress(ValueError):  # "<Token> was created in a different Context"
        otel_context._RUNTIME_CONTEXT.detach(token)  # detach() minus its logging of this case


@contextmanager
def server_span(
    name: str,
    traceparent: str | None,
    *,
    edge: bool = False,
    kind: SpanKind = SpanKind.SERVER,
    attributes: Mapping[str, AttributeValue] | None = None,
    record: bool = True,
) -> Iterator[Span]:
    """The span of one served request, current for its duration.

    An internal hop continues the caller's trace (``traceparent``). The ``edge`` (the gateway's public ports) starts
    a new trace whatever the client sent: a tenant must not choose the trace its requests join, nor make the install
    sample them; what it sent is kept as a span link. Off, no span is built: the caller's context (or a random one)
    is only made current, for the hops, the logs and the task. ``record=False`` does the same with tracing on, for a
    request that gets no span of its own: what it calls and logs stays in the caller's trace, under the caller's span.
    """
    remote = _parse_traceparent(traceparent) if traceparent else None
    tracer = _state.tracer
    if tracer is None or not (record or edge):
        off = NonRecordingSpan(remote if remote is not None and not edge else _random_context())
        token = otel_context.attach(trace.set_span_in_context(off, _EMPTY))
        try:
            yield off
        finally:
            _detach(token)
        return
    links: list[Link] = []
    if edge or remote is None:
        parent = _EMPTY  # a new root
        if remote is not None:
            links.append(Link(remote))
    else:
        parent = trace.set_span_in_context(NonRecordingSpan(remote), _EMPTY)
    # start_span and attach rather than start_as_current_span: two context managers fewer on every RPC.
    current = tracer.start_span(
        name, context=parent, kind=kind, attributes=attributes, links=links, record_exception=False
    )
    token = otel_context.attach(trace.set_span_in_context(current, parent))
    try:
        yield current
    finally:
        _detach(token)
        current.end()


@contextmanager
def resumed(
    trace_id: str,
    name: str = "task.run",
    attributes: Mapping[str, AttributeValue] | None = None,
    submitted_by: str | None = None,
) -> Iterator[Span]:
    """Work on a task outside the request that submitted it (a worker taking it from a queue, a restart): its spans
    and log lines join the task's trace by its ``trace_id`` (32 hex digits; a malformed one starts a new trace).

    ``submitted_by``, the submitting span's ``traceparent`` (:func:`traceparent` then), makes this span its child,
    sampled as the submission was. Without it the parent is a stand-in with the task's trace id: backends show it in
    the task's trace, under a parent they do not have.
    """
    if submitted_by and _parse_traceparent(submitted_by) is not None and submitted_by[3:35] == trace_id:
        parent: str | None = submitted_by
    else:
        valid = len(trace_id) == 32 and all(c in "0123456789abcdef" for c in trace_id) and int(trace_id, 16)
        flags = "01" if _state.tracer is not None else "00"
        parent = f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-{flags}" if valid else None
    with server_span(name, parent, kind=SpanKind.INTERNAL, attributes=attributes) as current:
        yield current


@contextmanager
def span(
    name: str, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, AttributeValue] | None = None
) -> Iterator[Span]:
    """A child span of the current one, current for the block; off, the current span, untouched and unrecorded.

    Exceptions are not recorded (their messages may quote a third party's answer); the caller sets ``error.type``.
    """
    tracer = _state.tracer
    if tracer is None:
        yield trace.get_current_span()
        return
    current = tracer.start_span(
        name, kind=kind, attributes=attributes, record_exception=False, set_status_on_exception=False
    )
    token = otel_context.attach(trace.set_span_in_context(current))
    try:
        yield current
    finally:
        _detach(token)
        current.end()


def set_attributes(target: Span, attributes: Mapping[str, AttributeValue]) -> None:
    """Attributes on a span that records (nothing to do when tracing is off or the span is not sampled)."""
    if target.is_recording():
        target.set_attributes(attributes)


def failed(target: Span, error_type: str) -> None:
    """Mark a span failed with a class of error (``error.type``): never the message, which may quote a secret."""
    if target.is_recording():
        target.set_attribute("error.type", error_type)
        target.set_status(Status(StatusCode.ERROR))


def current_trace_id() -> str:
    """The current trace's id as 32 hex digits (W3C), or "" outside any request."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def log_fields() -> tuple[str, str, bool] | None:
    """``(trace_id, span_id, sampled)`` of the current span, for a log line; None outside any request."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), ctx.trace_flags.sampled


def exemplar() -> dict[str, str] | None:
    """An OpenMetrics exemplar naming the current trace, when that trace is sampled (else nobody could open it)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": format(ctx.trace_id, "032x")}


def inject(carrier: MutableMapping[str, str]) -> None:
    """Add the current trace context (``traceparent``) to an internal call's metadata."""
    value = traceparent()
    if value is not None:
        carrier["traceparent"] = value


def outbound_headers(headers: MutableMapping[str, str]) -> None:
    """Add the trace context to a third party's request, only when the install asked for it.

    Off by default: the trace id and span ids would tell a third party which of its calls belong to one task.
    """
    if _state.propagate_outbound:
        inject(headers)
