"""Tool calls through the trust boundary: binding check, credential injection, retries, deadline, audit.

Transient failures (the tool service could not connect, or the third party answered 429, 502, 503 or 504) are
retried with tenacity, waiting what the third party's ``Retry-After`` asks up to a cap, all inside one deadline.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_exponential_jitter

from altan import context
from altan.clients import ServiceClient
from altan.errors import AltanError, DeadlineExceeded, NotFound, PermissionDenied, Unavailable
from altan.v1 import tool_pb2, tool_pb2_grpc
from altan.wire import dump_json, load_json
from services.integrator.audit import AuditLog
from services.integrator.credentials import CredentialBroker, ResolvedCredential

__all__ = ["CallResult", "ToolCaller"]

_TRANSIENT_STATUS = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class CallResult:
    output: Any
    http_status: int


class _TransientStatus(Exception):
    """The third party answered with a status worth retrying."""

    def __init__(self, response: tool_pb2.ExecuteToolResponse) -> None:
        super().__init__(f"HTTP {response.http_status}")
        self.response = response


class ToolCaller:
    """Runs tool calls for the current tenant."""

    def __init__(
        self,
        tools: ServiceClient[tool_pb2_grpc.ToolServiceStub],
        broker: CredentialBroker,
        audit: AuditLog,
        *,
        attempts: int,
        deadline_seconds: float,
        retry_after_cap: float,
    ) -> None:
        self._tools = tools
        self._broker = broker
        self._audit = audit
        self._attempts = attempts
        self._deadline = deadline_seconds
        self._retry_after_cap = retry_after_cap
        self._backoff = wait_exponential_jitter(initial=0.2, max=retry_after_cap)

    async def describe(self, tool_ids: list[str]) -> tuple[list[tool_pb2.Tool], list[str]]:
        wanted = list(dict.fromkeys(tool_ids))[:500]
        answer = await self._tools.call("ListTools", tool_pb2.ListToolsRequest(page_size=500, tool_ids=wanted))
        found = {t.tool_id for t in answer.tools}
        return list(answer.tools), [t for t in tool_ids if t not in found]

    async def invoke(
        self, tool_id: str, arguments: Any, *, agent_id: str, bound: list[str], task_id: str, step_id: str
    ) -> CallResult:
        """Run the tool; when it stays unreachable or answers 5xx, run its ``fallback_tool_id`` once instead."""
        if task_id:
            context.with_task(task_id)
        definition: dict[str, Any] = {}
        try:
            result = await self._call(tool_id, arguments, agent_id, bound, definition)
        except (Unavailable, DeadlineExceeded):
            if not definition.get("fallback_tool_id"):
                raise
            return await self._call(definition["fallback_tool_id"], arguments, agent_id, bound, {})
        if result.http_status >= 500 and definition.get("fallback_tool_id"):
            return await self._call(definition["fallback_tool_id"], arguments, agent_id, bound, {})
        return result

    async def _call(
        self, tool_id: str, arguments: Any, agent_id: str, bound: list[str], definition: dict[str, Any]
    ) -> CallResult:
        """One tool, audited; ``definition`` is filled with the tool's definition as soon as it is known."""
        started = time.monotonic()
        target = ""
        credential_name = ""
        try:
            if agent_id and tool_id not in bound:
                raise PermissionDenied(f"tool '{tool_id}' is not bound to agent '{agent_id}'")
            tool = (await self._tools.call("GetTool", tool_pb2.GetToolRequest(tool_id=tool_id))).tool
            definition.update(json.loads(tool.definition_json))
            credential_name = _credential_name(definition, arguments)
            credential = await self._broker.resolve(credential_name) if credential_name else None
            response = await self._execute(tool_id, arguments, credential, started)
            target = response.target
        except AltanError as exc:
            target = getattr(exc, "target", "") or target
            await self._audit.record(
                "tool.invoke",
                tool_id=tool_id,
                target=target,
                outcome="denied" if isinstance(exc, PermissionDenied | NotFound) else "error",
                latency_ms=_ms(started),
                reason=exc.message,
                credential=credential_name,
            )
            raise
        await self._audit.record(
            "tool.invoke",
            tool_id=tool_id,
            target=target,
            outcome="ok" if response.http_status < 400 else "error",
            latency_ms=_ms(started),
            reason="" if response.http_status < 400 else f"HTTP {response.http_status}",
            credential=credential_name,
        )
        return CallResult(load_json(response.output_json, "output"), response.http_status)

    async def _execute(
        self, tool_id: str, arguments: Any, credential: ResolvedCredential | None, started: float
    ) -> tool_pb2.ExecuteToolResponse:
        request = tool_pb2.ExecuteToolRequest(tool_id=tool_id, arguments_json=dump_json(arguments))
        if credential is not None:
            request.credential.CopyFrom(tool_pb2.InjectedCredential(**credential.model_dump()))
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts) | stop_after_delay(self._deadline),
            wait=self._wait,
            retry=retry_if_exception_type((Unavailable, _TransientStatus)),
            retry_error_callback=_last_outcome,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                remaining = self._deadline - (time.monotonic() - started)
                if remaining <= 0:
                    raise Unavailable(f"tool '{tool_id}' did not finish within {self._deadline:.0f}s")
                request.timeout_seconds = remaining
                response = await self._tools.call("ExecuteTool", request, timeout=remaining + 1)
                if response.http_status in _TRANSIENT_STATUS:
                    raise _TransientStatus(response)
        return response  # type: ignore[no-any-return]

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _TransientStatus) and exc.response.retry_after_seconds > 0:
            return min(exc.response.retry_after_seconds, self._retry_after_cap)
        return float(self._backoff(state))


def _last_outcome(state: RetryCallState) -> tool_pb2.ExecuteToolResponse:
    """After the last attempt: the third party's last answer stands; a lost connection is an error."""
    assert state.outcome is not None
    exc = state.outcome.exception()
    if isinstance(exc, _TransientStatus):
        return exc.response
    assert exc is not None
    raise exc


def _credential_name(definition: dict[str, Any], arguments: Any) -> str:
    if definition.get("type") == "custom" and definition.get("auth", "none") != "none":
        return str(definition.get("credential") or "")
    if definition.get("tool_id") == "http_request" and isinstance(arguments, dict):
        return str(arguments.get("credential") or "")
    return ""


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)

