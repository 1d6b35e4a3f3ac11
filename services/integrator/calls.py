"""Tool calls through the trust boundary: binding check, credential injection, retries, deadline, audit.

Transient failures (the tool service could not connect, or the third party answered 429, 502, 503 or 504) are
retried with tenacity, waiting what the third party's ``Retry-After`` asks up to a cap, all inside one deadline.
Arguments and outputs pass through as the JSON bytes they arrive in: the Tool Service parses and checks the
arguments, and the caller parses the output.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Span
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
)
from tenacity.wait import wait_exponential_jitter

from altan import context
from altan.api.mcp import server_spec_from_proto
from altan.api.tools import SELF_CONTAINED_BUILTINS
from altan.clients import ToolClient
from altan.context import require_admin
from altan.egress import destination
from altan.errors import (
    AltanError,
    DeadlineExceeded,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from altan.metrics import RATE_LIMITED, TOOL_CALL_SECONDS, TOOL_CALLS, count
from altan.store import TenantStore
from altan.telemetry import exemplar
from altan.v1 import common_pb2, runtime_pb2, tool_pb2
from altan.wire import parse_json
from services.integrator.audit import AuditIntent, AuditLog, outcome_of
from services.integrator.cache import ResponseCache
from services.integrator.credentials import CredentialBroker, ResolvedCredential

__all__ = ["CallResult", "ToolCaller"]

_TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
_HOST_HOLDS = "host-hold"  # per tenant: a third party's host -> until when it asked to be left alone (Unix time)
_MAX_HOST_HOLD_SECONDS = 3600.0


@dataclass(frozen=True)
class CallResult:
    """What a tool answered: its output as JSON bytes, and the third party's HTTP status (0 when none)."""

    output_json: bytes
    http_status: int
    cached: bool = False
    approval_required: bool = False  # the tool needs a person's approval of each call: nothing ran


class _ApprovalRequired(Exception):
    """A task's call of a tool with ``requires_approval`` that was not approved: it is not made."""


class _TransientStatus(Exception):
    """The third party answered with a status worth retrying."""

    def __init__(self, response: runtime_pb2.ExecuteToolResponse) -> None:
        super().__init__(f"HTTP {response.http_status}")
        self.response = response


class ToolCaller:
    """Runs tool calls for the current tenant."""

    def __init__(
        self,
        tools: ToolClient,
        broker: CredentialBroker,
        audit: AuditLog,
        *,
        attempts: int,
        deadline_seconds: float,
        retry_after_cap: float,
        cache: ResponseCache | None = None,
        limits: TenantStore | None = None,
    ) -> None:
        self._tools = tools
        self._cache = cache
        self._limits = limits
        self._broker = broker
        self._audit = audit
        self._attempts = attempts
        self._deadline = deadline_seconds
        self._retry_after_cap = retry_after_cap
        self._backoff = wait_exponential_jitter(multiplier=0.2, max=retry_after_cap, jitter=0.2)

    async def describe(self, tool_ids: list[str]) -> tuple[list[tool_pb2.Tool], list[str]]:
        """The tools that exist among ``tool_ids`` (at most 500), and the ids that do not."""
        wanted = list(dict.fromkeys(tool_ids))[:500]
        request = tool_pb2.ListToolsRequest(page_size=500, tool_ids=wanted)
        answer = await self._tools.call(self._tools.catalog.ListTools, request)
        found = {t.tool_id for t in answer.tools}
        return list(answer.tools), [t for t in tool_ids if t not in found]

    async def put_mcp_server(self, server: tool_pb2.McpServer) -> tuple[tool_pb2.McpServer, bool]:
        """Register an MCP server: the Tool Service connects with its credential and lists its tools; audited as
        ``mcp.list`` like a call. The server's URL is where its admin meant the credential to go."""
        require_admin("registering an MCP server")
        name, spec = server_spec_from_proto(server)
        started = time.monotonic()
        target = destination(spec.url)
        credential_name = spec.credential or ""
        intent: AuditIntent | None = None
        try:
            intent = await self._audit.begin("mcp.list", target=target, credential=credential_name)
            credential = await self._broker.resolve(credential_name) if credential_name else None
            request = runtime_pb2.SyncMcpServerRequest(server=server, timeout_seconds=self._deadline)
            if credential is not None:
                request.credential.CopyFrom(runtime_pb2.InjectedCredential(**credential.injected()))
            answer = await self._tools.call(self._tools.runtime.SyncMcpServer, request, timeout=self._deadline + 1)
        except AltanError as exc:
            await self._audit.record(
                "mcp.list",
                intent=intent,
                target=getattr(exc, "target", "") or target,
                outcome=outcome_of(exc),
                latency_ms=_ms(started),
                reason=exc.message,
                credential=credential_name,
            )
            raise
        await self._audit.record(
            "mcp.list",
            intent=intent,
            target=target,
            outcome="ok",
            latency_ms=_ms(started),
            reason=f"server '{name}': {len(answer.server.tools)} tools",
            credential=credential_name,
        )
        return answer.server, answer.created

    async def invoke(
        self,
        tool_id: str,
        arguments_json: bytes,
        *,
        agent_id: str = "",
        bound: list[str] | None = None,
        task_id: str = "",
        step_id: str = "",
        approval_gate: bool = False,
    ) -> CallResult:
        """Run the tool; when it stays unreachable or answers 5xx, run its ``fallback_tool_id`` once instead.

        ``approval_gate`` (a task's call not approved yet): a tool with ``requires_approval`` is not called, and the
        answer says ``approval_required``; the agent asks a person and calls again approved. Read from the definition
        the call reads anyway, so a task does not ask which of its tools need approval before it runs.

        With ``agent_id``, the tool (and its fallback) must be among ``bound``, the agent's tools. One deadline
        covers the whole call, fallback included: the caller waits that long and no longer. A task's step
        (``task_id`` and ``step_id``) sends ``Idempotency-Key: <task_id>:<step_id>`` on every attempt, the
        fallback's included: whichever of them reached the third party, the step is one operation there.
        """
        if task_id:
            context.with_task(task_id)
        key = f"{task_id}:{step_id}" if task_id and step_id else ""
        deadline_at = time.monotonic() + self._deadline
        fallback: list[str] = []
        try:
            result = await self._call(
                tool_id, arguments_json, agent_id, bound or [], fallback, deadline_at, key, approval_gate
            )
        except _ApprovalRequired:
            return CallResult(b"", 0, approval_required=True)
        except (Unavailable, DeadlineExceeded):
            if not fallback or time.monotonic() >= deadline_at:
                raise
            return await self._call(fallback[0], arguments_json, agent_id, bound or [], [], deadline_at, key)
        if result.http_status >= 500 and fallback and time.monotonic() < deadline_at:
            return await self._call(fallback[0], arguments_json, agent_id, bound or [], [], deadline_at, key)
        return result

    async def _definition(self, tool_id: str) -> tool_pb2.Tool | None:
        if tool_id in SELF_CONTAINED_BUILTINS:
            return None  # nothing to inject, nothing to fall back to: save the round trip
        return (await self._tools.call(self._tools.catalog.GetTool, tool_pb2.GetToolRequest(tool_id=tool_id))).tool

    async def _call(
        self,
        tool_id: str,
        arguments_json: bytes,
        agent_id: str,
        bound: list[str],
        fallback: list[str],
        deadline_at: float,
        idempotency_key: str = "",
        approval_gate: bool = False,
    ) -> CallResult:
        """One tool, counted by kind and outcome (``altan_tool_calls_total``) and described on the RPC's span.

        No span of its own: the RPC's server span (RunTool, InvokeTool) is this call, and the Tool Service's
        ExecuteTool spans under it show each attempt and a fallback; a span fewer per call is CPU saved.
        """
        started = time.perf_counter()
        kind = ["builtin"]  # known once the definition is read
        current = trace.get_current_span()
        try:
            result = await self._call_tool(
                tool_id, arguments_json, agent_id, bound, fallback, deadline_at, kind, idempotency_key, approval_gate
            )
        except AltanError as exc:
            outcome = "rate_limited" if isinstance(exc, ResourceExhausted) else outcome_of(exc)
            _counted(tool_id, kind[0], outcome, started, current)
            raise
        outcome = "cached" if result.cached else "ok" if result.http_status < 400 else "http_error"
        _counted(tool_id, kind[0], outcome, started, current)
        return result

    async def _call_tool(
        self,
        tool_id: str,
        arguments_json: bytes,
        agent_id: str,
        bound: list[str],
        fallback: list[str],
        deadline_at: float,
        kind: list[str],
        idempotency_key: str,
        approval_gate: bool = False,
    ) -> CallResult:
        """One tool, audited; ``fallback`` receives the tool's fallback as soon as its definition is known."""
        started = time.monotonic()
        target = ""
        credential_name = ""
        intent: AuditIntent | None = None
        try:
            if agent_id and tool_id not in bound:
                raise PermissionDenied(f"tool '{tool_id}' is not bound to agent '{agent_id}'")
            tool = await self._definition(tool_id)
            if approval_gate and tool is not None and tool.requires_approval:
                raise _ApprovalRequired  # before anything is counted, audited or called: nothing runs
            if tool is not None:
                kind[0] = _KINDS.get(tool.type, "builtin")
            if tool is not None and tool.fallback_tool_id:
                fallback.append(tool.fallback_tool_id)
            outbound = _outbound(tool, tool_id, arguments_json)
            credential_name = outbound.credential
            if tool is not None and tool.cacheable_seconds > 0 and self._cache is not None:
                hit = await self._cache.get(tool, arguments_json)
                if hit is not None:
                    await self._audit.record(
                        "tool.invoke",
                        tool_id=tool_id,
                        outcome="ok",
                        latency_ms=_ms(started),
                        reason="answered from the cache",
                        credential=credential_name,
                    )
                    return CallResult(*hit, cached=True)
            if tool is not None and tool.HasField("rate_limit") and self._limits is not None:
                await self._within_rate_limit(tool, deadline_at)
            if outbound.host and self._limits is not None:
                await self._after_host_hold(outbound.host, deadline_at)
            # Fail closed: no secret is read and no call runs until its audit entry is written.
            intent = await self._audit.begin("tool.invoke", tool_id=tool_id, credential=credential_name)
            credential = (
                await self._broker.resolve(
                    credential_name, destination=outbound.bound_to_hosts, container_tool=outbound.container_tool
                )
                if credential_name
                else None
            )
            response = await self._execute(tool_id, arguments_json, credential, deadline_at, idempotency_key)
            if response.http_status == 401 and credential is not None and credential.refreshable:
                # The third party refused the access token (revoked, expired early): refresh once, try once more.
                credential = await self._broker.refresh(credential_name, stale=credential.value)
                response = await self._execute(tool_id, arguments_json, credential, deadline_at, idempotency_key)
            target = response.target
            if response.retry_after_seconds > 0 and response.target and self._limits is not None:
                await self._hold_host(response.target, response.retry_after_seconds)
        except AltanError as exc:
            target = getattr(exc, "target", "") or target
            await self._audit.record(
                "tool.invoke",
                intent=intent,
                tool_id=tool_id,
                target=target,
                outcome=outcome_of(exc),
                latency_ms=_ms(started),
                reason=exc.message,
                credential=credential_name,
            )
            raise
        await self._audit.record(
            "tool.invoke",
            intent=intent,
            tool_id=tool_id,
            target=target,
            outcome="ok" if response.http_status < 400 else "error",
            latency_ms=_ms(started),
            reason="" if response.http_status < 400 else f"HTTP {response.http_status}",
            credential=credential_name,
        )
        if tool is not None and tool.cacheable_seconds > 0 and self._cache is not None:
            await self._cache.put(tool, arguments_json, response.output_json, response.http_status)
        return CallResult(response.output_json, response.http_status)

    async def _after_host_hold(self, host: str, deadline_at: float) -> None:
        """A host that asked this tenant to wait (429 with Retry-After, or its rate limit used up) is not called
        before that time: a direct call is RESOURCE_EXHAUSTED with the rest of the wait, a task's step waits it out
        within its deadline."""
        assert self._limits is not None
        until = await self._limits.get_expiring(_HOST_HOLDS, host)
        wait = float(until) - time.time() if until else 0.0
        if wait <= 0:
            return
        if not context.current().task_id or time.monotonic() + wait >= deadline_at:
            count(RATE_LIMITED, "host")
            raise ResourceExhausted(f"{host} asked to wait {wait:.1f}s before the next call", retry_after=wait)
        await asyncio.sleep(wait)

    async def _hold_host(self, host: str, seconds: float) -> None:
        """Remember, for every replica, that ``host`` asked this tenant to wait ``seconds`` (at most an hour)."""
        assert self._limits is not None
        seconds = min(seconds, _MAX_HOST_HOLD_SECONDS)
        await self._limits.set_expiring(_HOST_HOLDS, host, repr(time.time() + seconds), seconds)

    async def _within_rate_limit(self, tool: tool_pb2.Tool, deadline_at: float) -> None:
        """Take a token of the tool's ``rate_limit`` (per tenant, shared by every replica). Over it, a direct call is
        RESOURCE_EXHAUSTED with the wait in Retry-After; a task's step waits for capacity within its deadline."""
        assert self._limits is not None
        limit = tool.rate_limit
        while delay := await self._limits.take_token(f"tool:{tool.tool_id}", limit.requests, limit.per_seconds):
            if not context.current().task_id or time.monotonic() + delay >= deadline_at:
                count(RATE_LIMITED, "tool")
                raise ResourceExhausted(
                    f"tool '{tool.tool_id}' is over its rate limit of {limit.requests} calls per {limit.per_seconds}s",
                    retry_after=delay,
                )
            await asyncio.sleep(delay)

    async def _execute(
        self,
        tool_id: str,
        arguments_json: bytes,
        credential: ResolvedCredential | None,
        deadline_at: float,
        idempotency_key: str,
    ) -> runtime_pb2.ExecuteToolResponse:
        request = runtime_pb2.ExecuteToolRequest(
            tool_id=tool_id, arguments_json=arguments_json, idempotency_key=idempotency_key
        )
        if credential is not None:
            request.credential.CopyFrom(runtime_pb2.InjectedCredential(**credential.injected()))
        retrying = AsyncRetrying(
            # No wait that would end past the deadline: then the last answer stands (or the last error is raised).
            stop=stop_after_attempt(self._attempts) | stop_before_delay(max(0.0, deadline_at - time.monotonic())),
            wait=self._wait,
            retry=retry_if_exception_type((Unavailable, _TransientStatus)),
            retry_error_callback=_last_outcome,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                remaining = deadline_at - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(f"tool '{tool_id}' did not finish within {self._deadline:g}s")
                request.timeout_seconds = remaining
                response = await self._tools.call(self._tools.runtime.ExecuteTool, request, timeout=remaining + 1)
                if response.http_status in _TRANSIENT_STATUS:
                    raise _TransientStatus(response)
        return response  # type: ignore[no-any-return]

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _TransientStatus) and exc.response.retry_after_seconds > 0:
            return min(exc.response.retry_after_seconds, self._retry_after_cap)
        return float(self._backoff(state))


def _last_outcome(state: RetryCallState) -> runtime_pb2.ExecuteToolResponse:
    """After the last attempt: the third party's last answer stands; a lost connection is an error."""
    assert state.outcome is not None
    exc = state.outcome.exception()
    if isinstance(exc, _TransientStatus):
        return exc.response
    assert exc is not None
    raise exc


@dataclass(frozen=True)
class _Outbound:
    """Where a call goes and with what, as far as is known before it runs."""

    credential: str = ""  # the credential it injects, if any
    bound_to_hosts: str | None = None  # an http_request URL: the credential may go there only if its hosts name it
    host: str = ""  # ``host:port`` of a custom tool's endpoint or an http_request URL ("" when unknown)
    container_tool: str | None = None  # a container tool: the credential goes there only if its ``tools`` name it


def _outbound(tool: tool_pb2.Tool | None, tool_id: str, arguments_json: bytes) -> _Outbound:
    """The credential a call injects and where it goes.

    A custom tool's own credential goes to the endpoint its admin wrote (an MCP tool's, to its server); the one an
    http_request call names goes only to one of the credential's hosts; the one a container tool declares, only to a
    tool its credential's admin granted it to. http_request's arguments are parsed once here.
    """
    if tool is None:
        return _Outbound()
    if tool.type == tool_pb2.TOOL_TYPE_MCP:
        return _Outbound(credential=tool.credential)  # to the MCP server its admin registered with it
    if tool.type == tool_pb2.TOOL_TYPE_CONTAINER:
        # The container's code declares the credential; the operator deployed it, but only the tenant's admin may
        # let a tenant's secret reach it.
        return _Outbound(credential=tool.credential, container_tool=tool_id) if tool.credential else _Outbound()
    if tool.type == tool_pb2.TOOL_TYPE_CUSTOM:
        injects = tool.auth not in (common_pb2.AUTH_TYPE_NONE, common_pb2.AUTH_TYPE_UNSPECIFIED)
        return _Outbound(credential=tool.credential if injects else "", host=destination(tool.endpoint))
    if tool_id == "http_request":
        arguments = parse_json(arguments_json, "arguments", default={})
        url = arguments.get("url") if isinstance(arguments, dict) else None
        host = destination(url) if isinstance(url, str) else ""
        if isinstance(arguments, dict) and isinstance(arguments.get("credential"), str):
            return _Outbound(str(arguments["credential"]), str(url if url is not None else ""), host)
        return _Outbound(host=host)
    return _Outbound()


_KINDS = {
    tool_pb2.TOOL_TYPE_BUILTIN: "builtin",
    tool_pb2.TOOL_TYPE_CUSTOM: "http",
    tool_pb2.TOOL_TYPE_CONTAINER: "container",
    tool_pb2.TOOL_TYPE_MCP: "mcp",
}


def _counted(tool_id: str, kind: str, outcome: str, started: float, current: Span) -> None:
    sample = exemplar()
    TOOL_CALLS.labels(kind, outcome).inc(exemplar=sample)
    TOOL_CALL_SECONDS.labels(kind).observe(time.perf_counter() - started, exemplar=sample)
    if current.is_recording():
        current.set_attributes(
            {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": tool_id,
                "altan.tool.kind": kind,
                "altan.tool.outcome": outcome,
            }
        )


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
