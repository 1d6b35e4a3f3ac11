"""Structured JSON log lines in Cloud Logging's format, one per line on stdout.

Cloud Logging on GKE ingests these as they are: ``severity``, ``message``, ``time``, labels under
``logging.googleapis.com/labels`` (service, tenant, task) and ``logging.googleapis.com/sourceLocation``.
The tenant and task labels come from the request context, so a log call never has to pass them; the trace and span
ids from the current span (``trace_id``, ``span_id`` and Cloud Logging's ``logging.googleapis.com/spanId`` and
``trace_sampled``), so every line of one request, in every service, is found by the task's ``trace_id``, whether
tracing is on or off (altan.telemetry).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from altan import context, telemetry

__all__ = ["configure_logging"]

_SEVERITY = {"WARNING": "WARNING", "CRITICAL": "CRITICAL", "ERROR": "ERROR", "INFO": "INFO", "DEBUG": "DEBUG"}
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class CloudLoggingFormatter(logging.Formatter):
    """Formats a record as one Cloud Logging structured JSON line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        labels = {"service": self._service}
        ctx = context.current_or_none()
        if ctx is not None:
            labels["tenant_id"] = ctx.tenant_id
            if ctx.task_id:
                labels["task_id"] = ctx.task_id
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelname, "DEFAULT"),
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
            "logging.googleapis.com/labels": labels,
            "logging.googleapis.com/sourceLocation": {
                "file": record.pathname,
                "line": record.lineno,
                "function": record.funcName,
            },
        }
        ids = telemetry.log_fields()
        if ids is not None:
            entry["trace_id"], entry["span_id"], sampled = ids
            entry["logging.googleapis.com/spanId"] = entry["span_id"]
            entry["logging.googleapis.com/trace_sampled"] = sampled
        # Extra fields passed with ``extra={...}`` become structured payload fields.
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.levelno >= logging.ERROR:
            # The trace stays in our logs (never in a response) so operators can diagnose bugs.
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every log record of this process to stdout as Cloud Logging JSON; call once from ``__main__``."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(CloudLoggingFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Request lines of the HTTP server carry paths with ids, never secrets; keep them but quieter libraries down.
    for noisy in ("httpx", "httpcore", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
