"""LLM turns through the trust boundary: the key, retries, fallbacks, the egress guard and the audit trail.

An agent's LLM configuration names its provider (the wire format), endpoint and key. The key is a tenant credential
named in ``auth``, or, when ``auth`` names none, the install's own key for that provider, which is only ever sent
to the hosts configured for it. Transient failures (connection errors, 429 honouring ``Retry-After``, 5xx) are
retried with backoff and jitter; then the fallback LLMs are tried in order, each with its own key; all inside one
deadline. The key never leaves this process except in the request to the LLM's endpoint.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from opentelemetry.util.types import AttributeValue
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)
from tenacity.wait import wait_exponential_jitter

from altan import context, telemetry
from altan.api.convert import enum_name, struct_to_dict
from altan.errors import AltanError, FailedPrecondition, Unavailable
from altan.outbound import GuardedHttpClient
from altan.v1 import agent_pb2, common_pb2, runtime_pb2
from services.integrator.audit import AuditIntent, AuditLog, outcome_of
from services.integrator.credentials import CredentialBroker
from services.integrator.llm.base import (
    Message,
    ModelProvider,
    ModelRequest,
    ModelTurn,
    ProviderError,
    ToolCall,
    ToolSpec,
)
from services.integrator.metrics import LlmMetrics

__all__ = ["InstallKey", "ModelCaller"]

_PROVIDER = agent_pb2.LlmProvider.DESCRIPTOR
_ROLES = {
    agent_pb2.MESSAGE_ROLE_USER: "user",
    agent_pb2.MESSAGE_ROLE_ASSISTANT: "assistant",
    agent_pb2.MESSAGE_ROLE_TOOL: "tool",
}

OnDelta = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class InstallKey:
    """The install's own key for one provider, and the only hosts it may be sent to."""

    value: str
    hosts: frozenset[str]


class _Streamed(Exception):
    """A turn failed after part of its text was streamed: not retried (the text would come twice)."""

    def __init__(self, cause: ProviderError | Unavailable) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, Unavailable) or (isinstance(exc, ProviderError) and exc.transient)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ProviderError) and exc.status in (401, 403):
        # What an API says about a refused key may quote part of it ("Incorrect API key provided: sk-ab***yz").
        return f"the LLM refused the key ({exc.status})"
    if isinstance(exc, ProviderError | AltanError):
        return exc.message
    return type(exc).__name__


class ModelCaller:
    """Runs LLM turns for the current tenant."""

    def __init__(
        self,
        http: GuardedHttpClient,
        broker: CredentialBroker,
        audit: AuditLog,
        *,
        attempts: int,
        deadline_seconds: float,
        retry_after_cap: float,
        install_keys: dict[str, InstallKey],
        providers: Mapping[str, ModelProvider],
        metrics: LlmMetrics | None = None,
    ) -> None:
        self._providers = providers
        self._metrics = metrics
        self._http = http
        self._broker = broker
        self._audit = audit
        self._attempts = attempts
        self._deadline = deadline_seconds
        self._retry_after_cap = retry_after_cap
        self._install_keys = install_keys
        self._backoff = wait_exponential_jitter(multiplier=0.5, max=retry_after_cap, jitter=0.5)

    async def complete(self, request: runtime_pb2.CompleteRequest, on_delta: OnDelta | None) -> runtime_pb2.ModelAnswer:
        """One turn: the agent's LLM, then its fallbacks in order; the first answer wins."""
        if request.task_id:
            context.with_task(request.task_id)
        if not request.HasField("llm"):
            raise FailedPrecondition("the agent has no llm: give it one, or submit a structured plan")
        started = time.monotonic()
        deadline_at = started + self._deadline
        messages = tuple(_message(m) for m in request.messages)
        tools = tuple(
            ToolSpec(t.name, t.description, json.loads(t.input_schema_json) if t.input_schema_json else {})
            for t in request.tools
        )
        failures: list[str] = []
        llms = [request.llm, *request.fallback_llms]
        for index, llm in enumerate(llms):
            remaining = deadline_at - time.monotonic()
            if remaining <= 0:
                failures.append(f"{llm.llm_id}: no time left")
                break
            try:
                turn, provider = await self._turn(llm, request, messages, tools, on_delta, deadline_at)
            except (AltanError, ProviderError, _Streamed) as exc:
                if len(llms) == 1 and isinstance(exc, AltanError):
                    raise  # one LLM: its own error (a credential not found, egress refused...) says it best
                failures.append(f"{llm.llm_id}: {_reason(exc.cause if isinstance(exc, _Streamed) else exc)}")
                continue
            if self._metrics is not None:
                usage = turn.usage
                self._metrics.answered(provider, llm.llm_id, usage.input_tokens, usage.output_tokens, index > 0)
            return runtime_pb2.ModelAnswer(
                message=_to_proto(turn.message),
                input_tokens=turn.usage.input_tokens,
                output_tokens=turn.usage.output_tokens,
                stop_reason=turn.stop_reason,
                model=turn.model or llm.llm_id,
                provider=provider,
                fallback_used=index > 0,
                latency_ms=int((time.monotonic() - started) * 1000),
            )
        raise Unavailable("no LLM answered: " + "; ".join(failures))

    async def _turn(
        self,
        llm: agent_pb2.LlmConfig,
        request: runtime_pb2.CompleteRequest,
        messages: tuple[Message, ...],
        tools: tuple[ToolSpec, ...],
        on_delta: OnDelta | None,
        deadline_at: float,
    ) -> tuple[ModelTurn, str]:
        """One LLM in its span (the GenAI semantic conventions: model, provider, tokens; never a prompt, a
        completion or a key), retried on transient failures; audited once, whatever came of it."""
        provider_name = enum_name(_PROVIDER, llm.provider) or ""
        caller = context.current()
        host, _, port = _target(llm.endpoint).rpartition(":")
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider_name,
            "gen_ai.system": provider_name,  # the name before semantic conventions 1.37, which most backends read
            "gen_ai.request.model": llm.llm_id,
            "server.address": host,
            telemetry.TENANT: caller.tenant_id,
        }
        if caller.task_id:
            attributes[telemetry.TASK] = caller.task_id
        if port.isdigit():
            attributes["server.port"] = int(port)
        with telemetry.span(f"chat {llm.llm_id}", telemetry.SpanKind.CLIENT, attributes) as current:
            try:
                turn, provider = await self._call_llm(
                    llm, provider_name, request, messages, tools, on_delta, deadline_at
                )
            except (AltanError, ProviderError, _Streamed) as exc:
                telemetry.failed(current, outcome_of(exc))
                raise
            telemetry.set_attributes(
                current,
                {
                    "gen_ai.response.model": turn.model or llm.llm_id,
                    "gen_ai.response.finish_reasons": [turn.stop_reason] if turn.stop_reason else [],
                    "gen_ai.usage.input_tokens": turn.usage.input_tokens,
                    "gen_ai.usage.output_tokens": turn.usage.output_tokens,
                },
            )
            return turn, provider

    async def _call_llm(
        self,
        llm: agent_pb2.LlmConfig,
        provider_name: str,
        request: runtime_pb2.CompleteRequest,
        messages: tuple[Message, ...],
        tools: tuple[ToolSpec, ...],
        on_delta: OnDelta | None,
        deadline_at: float,
    ) -> tuple[ModelTurn, str]:
        started = time.monotonic()
        credential = llm.auth.credential if llm.HasField("auth") else ""
        target = _target(llm.endpoint)
        key: str | None = None
        intent: AuditIntent | None = None
        try:
            provider = self._providers.get(provider_name)
            if provider is None:
                raise FailedPrecondition(f"no provider {provider_name!r} in this build")
            # Fail closed: no key is read and no model is called until the call's audit entry is written.
            intent = await self._audit.begin("llm.call", model=llm.llm_id, target=target, credential=credential)
            key = await self._key(llm, provider_name)
            model_request = ModelRequest(
                model=llm.llm_id,
                endpoint=llm.endpoint,
                api_key=key,
                system=request.system,
                messages=messages,
                tools=tools,
                parameters=struct_to_dict(llm.parameters),
                stream=request.stream,
            )
            streamed = False

            async def delta(text: str) -> None:
                nonlocal streamed
                streamed = True
                if on_delta is not None:
                    await on_delta(text)

            retrying = AsyncRetrying(
                stop=stop_after_attempt(self._attempts) | stop_before_delay(max(0.0, deadline_at - started)),
                wait=self._wait,
                retry=retry_if_exception(_transient),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    remaining = deadline_at - time.monotonic()
                    if remaining <= 0:
                        raise Unavailable(f"no answer within {self._deadline:g}s")
                    try:
                        async with asyncio.timeout(remaining):
                            turn = await provider.complete(
                                _with_timeout(model_request, remaining), self._http, delta if request.stream else None
                            )
                    except TimeoutError:
                        raise Unavailable(f"no answer within {self._deadline:g}s") from None
                    except (ProviderError, Unavailable) as exc:
                        if streamed:
                            raise _Streamed(exc) from None
                        raise
        except (AltanError, ProviderError, _Streamed) as exc:
            cause = exc.cause if isinstance(exc, _Streamed) else exc
            if key and key in cause.message:  # an endpoint that echoes what it was sent
                cause.message = cause.message.replace(key, "[redacted]")
            outcome = outcome_of(exc)
            if self._metrics is not None:
                self._metrics.called(provider_name, llm.llm_id, outcome, time.monotonic() - started)
            await self._audit.record(
                "llm.call",
                intent=intent,
                model=llm.llm_id,
                target=getattr(exc, "target", "") or target,
                outcome=outcome,
                latency_ms=_ms(started),
                reason=_reason(cause),
                credential=credential,
            )
            raise
        if self._metrics is not None:
            self._metrics.called(provider_name, llm.llm_id, "ok", time.monotonic() - started)
        await self._audit.record(
            "llm.call", intent=intent, model=llm.llm_id, target=target, latency_ms=_ms(started), credential=credential
        )
        return turn, provider_name

    async def _key(self, llm: agent_pb2.LlmConfig, provider: str) -> str | None:
        """The key of one LLM: the tenant's credential its auth names, else the install's key for its provider
        when the endpoint is one of that key's hosts, else none."""
        if llm.HasField("auth"):
            if llm.auth.type == common_pb2.AUTH_TYPE_NONE:
                return None
            if llm.auth.credential:
                return (await self._broker.resolve(llm.auth.credential)).value
        install = self._install_keys.get(provider)
        if install is not None and (urlsplit(llm.endpoint).hostname or "") in install.hosts:
            return install.value
        return None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ProviderError) and exc.retry_after is not None:
            return min(exc.retry_after, self._retry_after_cap)
        return float(self._backoff(state))


def _with_timeout(request: ModelRequest, seconds: float) -> ModelRequest:
    return replace(request, timeout=seconds)


def _message(msg: agent_pb2.ThreadMessage) -> Message:
    return Message(
        role=_ROLES.get(msg.role, "user"),  # type: ignore[arg-type]
        content=msg.content,
        tool_calls=tuple(ToolCall(c.id, c.name, c.arguments_json) for c in msg.tool_calls),
        tool_call_id=msg.tool_call_id,
        name=msg.name,
        is_error=msg.is_error,
    )


def _to_proto(message: Message) -> agent_pb2.ThreadMessage:
    return agent_pb2.ThreadMessage(
        role=agent_pb2.MESSAGE_ROLE_ASSISTANT,
        content=message.content,
        tool_calls=[
            agent_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json) for c in message.tool_calls
        ],
    )


def _target(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return ""
    return f"{parts.hostname}:{port}" if parts.hostname else ""


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
