"""altan.logging: one Cloud Logging JSON line per record, labelled from the request context."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import sys
from datetime import datetime
from typing import Any

import pytest

from altan import context
from altan.context import RequestContext
from altan.logging import CloudLoggingFormatter, configure_logging

CALLER = RequestContext(tenant_id="acme", user="alice", role="admin", token="secret-token-value")


def in_fresh_context(fn: Any) -> Any:
    """Run ``fn`` in a context of its own, so a bound caller never leaks into other tests."""
    return contextvars.Context().run(fn)


def record(
    logger_name: str = "altan.test",
    level: int = logging.INFO,
    msg: str = "hello %s",
    args: tuple[Any, ...] = ("world",),
    extra: dict[str, Any] | None = None,
    exc_info: Any = None,
) -> logging.LogRecord:
    logger = logging.getLogger(logger_name)
    return logger.makeRecord(logger_name, level, __file__, 42, msg, args, exc_info, func="some_function", extra=extra)


def formatted(rec: logging.LogRecord, service: str = "agent") -> dict[str, Any]:
    line = CloudLoggingFormatter(service).format(rec)
    assert "\n" not in line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_record_inside_a_request_with_a_task() -> None:
    def run() -> dict[str, Any]:
        context.bind(CALLER)
        context.with_task("tsk_123")
        return formatted(record(extra={"tool_id": "slack_notify", "attempt": 2, "nested": {"a": [1]}}))

    entry = in_fresh_context(run)
    assert entry["severity"] == "INFO"
    assert entry["message"] == "hello world"
    assert datetime.fromisoformat(entry["time"]).utcoffset() is not None
    assert entry["logger"] == "altan.test"
    assert entry["logging.googleapis.com/labels"] == {"service": "agent", "tenant_id": "acme", "task_id": "tsk_123"}
    assert entry["logging.googleapis.com/sourceLocation"] == {
        "file": __file__,
        "line": 42,
        "function": "some_function",
    }
    assert (entry["tool_id"], entry["attempt"], entry["nested"]) == ("slack_notify", 2, {"a": [1]})
    # The caller's token is never part of a log line.
    assert "secret-token-value" not in json.dumps(entry)


def test_record_outside_any_request_has_only_the_service_label() -> None:
    entry = in_fresh_context(lambda: formatted(record(), service="tool"))
    assert entry["logging.googleapis.com/labels"] == {"service": "tool"}


def test_request_without_a_task_has_no_task_label() -> None:
    def run() -> dict[str, Any]:
        context.bind(CALLER)
        return formatted(record())

    assert in_fresh_context(run)["logging.googleapis.com/labels"] == {"service": "agent", "tenant_id": "acme"}


@pytest.mark.parametrize(
    ("level", "severity"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARNING"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "CRITICAL"),
        (5, "DEFAULT"),
    ],
)
def test_severity(level: int, severity: str) -> None:
    assert in_fresh_context(lambda: formatted(record(level=level)))["severity"] == severity


def test_standard_record_attributes_are_not_copied_as_fields() -> None:
    entry = in_fresh_context(lambda: formatted(record()))
    for attribute in (
        "args",
        "msg",
        "levelno",
        "pathname",
        "lineno",
        "funcName",
        "created",
        "process",
        "thread",
        "exc_info",
        "stack_info",
        "taskName",
    ):
        assert attribute not in entry


def test_multiline_messages_and_odd_values_stay_one_line() -> None:
    entry = in_fresh_context(
        lambda: formatted(record(msg="line one\nline two\r\n\u2028end", args=(), extra={"obj": object(), "b": b"x"}))
    )
    assert entry["message"] == "line one\nline two\r\n\u2028end"
    assert entry["obj"].startswith("<object object")
    assert entry["b"] == "b'x'"


def test_exception_trace_is_kept_for_errors_only() -> None:
    try:
        raise ValueError("kaput")
    except ValueError:
        exc_info = sys.exc_info()
    error = in_fresh_context(lambda: formatted(record(level=logging.ERROR, exc_info=exc_info)))
    assert "ValueError: kaput" in error["exception"]
    warning = in_fresh_context(lambda: formatted(record(level=logging.WARNING, exc_info=exc_info)))
    assert "exception" not in warning


def test_configure_logging_writes_json_lines_to_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "grpc")}
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    try:
        configure_logging("integrator", "WARNING")
        logging.getLogger("altan.test").info("quiet")
        logging.getLogger("altan.test").warning("loud %d", 1, extra={"k": "v"})
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert (entry["severity"], entry["message"], entry["k"]) == ("WARNING", "loud 1", "v")
    assert entry["logging.googleapis.com/labels"]["service"] == "integrator"
