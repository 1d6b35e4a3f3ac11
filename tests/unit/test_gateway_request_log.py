"""The gateway's request lines: a request answered as asked is a DEBUG line, a refusal or a failure an INFO one."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry
from starlette.types import Message, Receive, Scope, Send

from services.gateway.middleware import MetricsMiddleware


def _answering(status: int) -> MetricsMiddleware:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return MetricsMiddleware(app, registry=CollectorRegistry())


async def _request(middleware: MetricsMiddleware) -> None:
    scope = {"type": "http", "method": "POST", "path": "/v1/agents/a/tasks", "headers": []}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    await middleware(scope, receive, send)


@pytest.mark.parametrize(("status", "logged_at_info"), [(202, False), (404, True), (503, True)])
async def test_request_lines_at_info_are_the_refusals_and_failures(
    caplog: pytest.LogCaptureFixture, status: int, logged_at_info: bool
) -> None:
    with caplog.at_level(logging.INFO, logger="altan.gateway.requests"):
        await _request(_answering(status))
    lines = [r for r in caplog.records if r.name == "altan.gateway.requests"]
    assert [r.getMessage() for r in lines] == ([f"POST unmatched {status}"] if logged_at_info else [])


async def test_every_request_line_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="altan.gateway.requests"):
        await _request(_answering(202))
    (line,) = [r for r in caplog.records if r.name == "altan.gateway.requests"]
    assert line.levelno == logging.DEBUG and line.httpRequest["status"] == 202  # type: ignore[attr-defined]
