"""altan.telemetry and altan.metrics: OTEL_* configuration, the trace context of a request, spans, log fields."""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import generate_latest

from altan import metrics, telemetry
from altan.logging import CloudLoggingFormatter

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


def fresh(fn: Any) -> Any:
    """Run ``fn`` in a context of its own: no span of one test is current in another."""
    return contextvars.Context().run(fn)


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Tracing on, every span sampled and kept in memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry._state.tracer = provider.get_tracer("test")
    yield exporter
    telemetry._state.tracer = None
    telemetry._state.propagate_outbound = False


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, ()),  # off unless asked for
        ({"OTEL_TRACES_EXPORTER": "none"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ("otlp", "console")),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",)),  # what an operator injects
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, ()),
    ],
)
def test_the_otel_variables_say_whether_spans_are_exported(environ: dict[str, str], exporters: tuple[str, ...]) -> None:
    setup = telemetry.configure_tracing("agent", environ=environ)
    try:
        assert setup.enabled == bool(exporters) and setup.exporters == exporters
        assert telemetry.enabled() == bool(exporters)
    finally:
        setup.shutdown()
        telemetry._state.tracer = None


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
    ],
)
def test_an_exporter_or_protocol_this_build_lacks_is_refused_at_start(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="OTEL_"):
        telemetry.configure_tracing("agent", environ=environ)
    telemetry._state.tracer = None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"01-{CLIENT_TRACE}-00f067aa0ba902b7-01",  # only version 00 is read
        f"00-{CLIENT_TRACE.upper()}-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{CLIENT_TRACE}-{'0' * 16}-01",
        f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01-extra",
    ],
)
def test_a_malformed_traceparent_starts_a_new_trace(value: str) -> None:
    def run() -> str:
        with telemetry.server_span("altan.v1.X/Y", value):
            return telemetry.current_trace_id()

    trace_id = fresh(run)
    assert len(trace_id) == 32 and trace_id not in (CLIENT_TRACE, "0" * 32)


def test_tracing_off_a_hop_continues_its_callers_trace_and_passes_it_on() -> None:
    unsampled = CLIENT_PARENT.removesuffix("01") + "00"  # what an install with tracing off sends

    def run() -> tuple[str, dict[str, str], str | None]:
        with telemetry.server_span("altan.v1.X/Y", unsampled) as current:
            assert not current.is_recording()
            carrier: dict[str, str] = {}
            telemetry.inject(carrier)
            return telemetry.current_trace_id(), carrier, telemetry.exemplar() and "sampled"

    trace_id, carrier, sample = fresh(run)
    assert trace_id == CLIENT_TRACE
    assert carrier == {"traceparent": unsampled}  # the caller's own context, passed on as it came
    assert sample is None  # no exemplar names a trace that nothing recorded
    assert fresh(telemetry.current_trace_id) == ""


def test_tracing_off_the_edge_draws_a_trace_id_of_its_own_for_each_request() -> None:
    def run() -> str:
        with telemetry.server_span("POST", CLIENT_PARENT, edge=True):
            return telemetry.current_trace_id()

    first, second = fresh(run), fresh(run)
    assert CLIENT_TRACE not in (first, second) and first != second


def test_tracing_on_a_hop_is_a_child_of_its_callers_span(exported: InMemorySpanExporter) -> None:
    def run() -> None:
        with telemetry.server_span("altan.v1.X/Y", CLIENT_PARENT, attributes={"rpc.system": "grpc"}) as served:
            telemetry.set_attributes(served, {telemetry.TENANT: "acme"})
            with telemetry.span("GET", SpanKind.CLIENT, {"server.port": 443}) as outbound:
                telemetry.failed(outbound, "Unavailable")

    fresh(run)
    outbound, served = exported.get_finished_spans()
    assert format(served.context.trace_id, "032x") == CLIENT_TRACE
    assert served.parent is not None and format(served.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert served.kind == SpanKind.SERVER and served.attributes == {"rpc.system": "grpc", telemetry.TENANT: "acme"}
    assert outbound.parent is not None and outbound.parent.span_id == served.context.span_id
    assert outbound.attributes == {"server.port": 443, "error.type": "Unavailable"}
    assert not outbound.events  # no exception recorded: its message may quote a third party


def test_tracing_on_a_hop_without_a_span_of_its_own_passes_the_trace_through(exported: InMemorySpanExporter) -> None:
    """record=False (a lookup, altan.server.UNTRACED_METHODS): no span, and what it calls hangs off the caller's."""

    def run() -> str | None:
        with telemetry.server_span("altan.v1.ToolService/GetTool", CLIENT_PARENT, record=False) as served:
            assert not served.is_recording()
            with telemetry.span("GET", SpanKind.CLIENT):
                return telemetry.current_trace_id()

    assert fresh(run) == CLIENT_TRACE
    (outbound,) = exported.get_finished_spans()
    assert format(outbound.context.trace_id, "032x") == CLIENT_TRACE
    assert outbound.parent is not None and format(outbound.parent.span_id, "016x") == "00f067aa0ba902b7"


def test_the_edge_always_has_its_span(exported: InMemorySpanExporter) -> None:
    """A public call of a lookup (the gateway's gRPC proxy) starts its trace: that takes a span."""

    def run() -> None:
        with telemetry.server_span("altan.v1.ToolService/GetTool", CLIENT_PARENT, edge=True, record=False) as root:
            assert root.is_recording()

    fresh(run)
    assert len(exported.get_finished_spans()) == 1


def test_tracing_on_the_edge_starts_a_new_trace_and_links_what_the_client_sent(
    exported: InMemorySpanExporter,
) -> None:
    def run() -> dict[str, str] | None:
        with telemetry.server_span("POST", CLIENT_PARENT, edge=True):
            return telemetry.exemplar()

    sample = fresh(run)
    (root,) = exported.get_finished_spans()
    assert root.parent is None and format(root.context.trace_id, "032x") != CLIENT_TRACE
    assert [format(link.context.trace_id, "032x") for link in root.links] == [CLIENT_TRACE]
    assert sample == {"trace_id": format(root.context.trace_id, "032x")}


def test_the_trace_context_goes_to_third_parties_only_when_configured(exported: InMemorySpanExporter) -> None:
    def headers() -> dict[str, str]:
        sent: dict[str, str] = {}
        with telemetry.server_span("altan.v1.X/Y", CLIENT_PARENT):
            telemetry.outbound_headers(sent)
        return sent

    assert fresh(headers) == {}
    telemetry._state.propagate_outbound = True
    assert fresh(headers)["traceparent"].startswith(f"00-{CLIENT_TRACE}-")


def test_every_log_line_of_a_request_carries_its_trace_and_span_ids() -> None:
    formatter = CloudLoggingFormatter("agent")
    record = logging.LogRecord("altan.test", logging.INFO, __file__, 1, "hello", None, None)

    def inside() -> dict[str, Any]:
        with telemetry.server_span("altan.v1.X/Y", CLIENT_PARENT):
            return dict(json.loads(formatter.format(record)))

    line = fresh(inside)
    assert line["trace_id"] == CLIENT_TRACE and line["span_id"] == "00f067aa0ba902b7"
    assert line["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert line["logging.googleapis.com/trace_sampled"] is True
    outside = fresh(lambda: json.loads(formatter.format(record)))
    assert "trace_id" not in outside


def test_the_task_queue_reports_its_depth_through_a_gauge() -> None:
    metrics.set_task_queue_depth(7)
    try:
        assert b"altan_task_queue_depth 7.0" in generate_latest(metrics.REGISTRY)
    finally:
        metrics.set_task_queue_depth(0)


def test_rpc_metrics_are_labelled_by_service_method_and_code() -> None:
    timer = metrics.GrpcTimer(metrics.GRPC_SERVER_HANDLED, metrics.GRPC_SERVER_SECONDS, "/altan.v1.Probe/Ping")
    timer.observe(0.0, "NOT_FOUND")
    text = generate_latest(metrics.REGISTRY).decode()
    labels = 'grpc_method="Ping",grpc_service="altan.v1.Probe",grpc_type="unary"'
    assert f'altan_grpc_server_handled_total{{grpc_code="NotFound",{labels}}} 1.0' in text
    assert f"altan_grpc_server_handling_seconds_count{{{labels}}} 1.0" in text


@pytest.mark.parametrize(
    ("name", "label"),
    [("OK", "OK"), ("CANCELLED", "Canceled"), ("DEADLINE_EXCEEDED", "DeadlineExceeded"), ("INTERNAL", "Internal")],
)
def test_status_codes_are_named_as_grpc_ecosystem_names_them(name: str, label: str) -> None:
    assert metrics.grpc_code(name) == label


def test_work_resumed_later_joins_the_tasks_trace(exported: InMemorySpanExporter) -> None:
    def run() -> str:
        with telemetry.resumed(CLIENT_TRACE, attributes={telemetry.TASK: "tsk_1"}):
            return telemetry.current_trace_id()

    assert fresh(run) == CLIENT_TRACE
    (resumed,) = exported.get_finished_spans()
    assert resumed.name == "task.run" and resumed.attributes == {telemetry.TASK: "tsk_1"}


def test_a_malformed_trace_id_resumes_in_a_new_trace() -> None:
    def run() -> str:
        with telemetry.resumed("not-a-trace-id"):
            return telemetry.current_trace_id()

    assert len(fresh(run)) == 32


@pytest.mark.parametrize("tracing", ["off", "on"])
async def test_a_served_stream_closed_from_another_context_ends_quietly(
    tracing: str, exported: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc.aio may close a streaming handler (a client that went away) from a context other than the one that
    iterated it: the span's context cannot be reset there, and that is no error (it once logged a traceback)."""
    import asyncio

    if tracing == "off":
        telemetry._state.tracer = None

    async def served() -> Any:
        with telemetry.server_span("Stream", CLIENT_PARENT):
            yield 1
            yield 2

    stream = served()
    assert await asyncio.create_task(anext(stream)) == 1  # iterated in one task's context
    with caplog.at_level(logging.DEBUG):
        await asyncio.create_task(stream.aclose())  # closed in another's
    assert not [r for r in caplog.records if r.exc_info or "detach" in r.getMessage()]
    if tracing == "on":
        assert [s.name for s in exported.get_finished_spans()] == ["Stream"]
