"""services.integrator.models.ModelCaller: which key goes where, retries inside one deadline, fallbacks in order,
no retry once text has streamed, one audit event per LLM tried, and never the key in an error or the audit.

The provider below stands in for an LLM API (the wire formats have their own tests, against the fake servers of
tests/fakes/llm.py): it answers each model from a script and records the requests it was given. The
CredentialBroker and AuditLog are real, on the in-process MemoryBackend. What the caller waits between attempts
is recorded by handing tenacity a sleep that notes each wait and then really sleeps it.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from tenacity import AsyncRetrying

from altan.api.credentials import parse_credential_spec
from altan.errors import EgressRefused, FailedPrecondition, PermissionDenied, Unavailable
from altan.store import MemoryBackend, TenantStore
from altan.v1 import agent_pb2, common_pb2, runtime_pb2
from services.integrator import models
from services.integrator.audit import AuditLog
from services.integrator.credentials import CredentialBroker
from services.integrator.llm.base import Message, ModelRequest, ModelTurn, OnDelta, ProviderError, ToolCall, Usage
from services.integrator.metrics import LlmMetrics
from services.integrator.models import InstallKey, ModelCaller
from services.integrator.secrets import LocalSecretBackend
from tests.unit.test_tool_caller import caller_as

INSTALL_KEY = "sk-install-0123456789abcdef"
TENANT_KEY = "sk-tenant-fedcba9876543210"
OPENAI = "https://api.openai.com/v1/chat/completions"
HANG = "hang"


def turn(text: str = "hello", *calls: ToolCall, model: str = "") -> ModelTurn:
    return ModelTurn(Message("assistant", text, tuple(calls)), Usage(12, 3), "stop", model)


@dataclass
class Streams:
    """In a script: stream ``deltas`` through on_delta, then fail with ``error``."""

    deltas: list[str]
    error: Exception


Item = ModelTurn | Exception | Streams | str


@dataclass
class ScriptedProvider:
    """Answers each model from its script, one item an attempt, the last item again once it runs out."""

    name: str = "openai"
    scripts: dict[str, list[Item]] = field(default_factory=dict)
    requests: list[ModelRequest] = field(default_factory=list)

    async def complete(self, request: ModelRequest, http: Any, on_delta: OnDelta | None = None) -> ModelTurn:
        self.requests.append(request)
        script = self.scripts.get(request.model) or [turn(model=request.model)]
        item = script.pop(0) if len(script) > 1 else script[0]
        if item == HANG:
            await asyncio.Event().wait()
        if isinstance(item, Streams):
            for text in item.deltas:
                assert on_delta is not None
                await on_delta(text)
            raise item.error
        if isinstance(item, Exception):
            raise item
        assert isinstance(item, ModelTurn)
        return item

    def models_asked(self) -> list[str]:
        return [r.model for r in self.requests]


@dataclass
class Rig:
    provider: ScriptedProvider
    broker: CredentialBroker
    audit: AuditLog
    waits: list[float]

    def caller(self, *, attempts: int = 3, deadline: float = 10.0, metrics: LlmMetrics | None = None) -> ModelCaller:
        return ModelCaller(
            http=None,  # type: ignore[arg-type]  # the scripted provider sends nothing
            broker=self.broker,
            audit=self.audit,
            attempts=attempts,
            deadline_seconds=deadline,
            retry_after_cap=0.05,
            install_keys={"openai": InstallKey(INSTALL_KEY, frozenset({"api.openai.com"}))},
            providers={"openai": self.provider},
            metrics=metrics,
        )

    async def events(self) -> list[dict[str, Any]]:
        return await self.audit.query("", 1000)


@pytest.fixture
async def rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    waits: list[float] = []

    async def noted_sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    monkeypatch.setattr(models, "AsyncRetrying", functools.partial(AsyncRetrying, sleep=noted_sleep))
    store = TenantStore(MemoryBackend(), "integrator")
    caller_as(tenant="acme")
    yield Rig(
        ScriptedProvider(), CredentialBroker(store, LocalSecretBackend(store, os.urandom(32))), AuditLog(store), waits
    )


def llm(model: str = "gpt-4o", endpoint: str = OPENAI, credential: str = "", **fields: Any) -> agent_pb2.LlmConfig:
    config = agent_pb2.LlmConfig(llm_id=model, provider=agent_pb2.LLM_PROVIDER_OPENAI, endpoint=endpoint, **fields)
    if credential:
        config.auth.CopyFrom(agent_pb2.LlmAuth(type=common_pb2.AUTH_TYPE_API_KEY, credential=credential))
    return config


def ask(*llms: agent_pb2.LlmConfig, stream: bool = False, **fields: Any) -> runtime_pb2.CompleteRequest:
    first, *rest = llms or (llm(),)
    return runtime_pb2.CompleteRequest(
        llm=first,
        fallback_llms=rest,
        system="be brief",
        messages=[agent_pb2.ThreadMessage(role=agent_pb2.MESSAGE_ROLE_USER, content="hi")],
        stream=stream,
        **fields,
    )


async def complete(rig: Rig, request: runtime_pb2.CompleteRequest, **caller: Any) -> runtime_pb2.ModelAnswer:
    return await rig.caller(**caller).complete(request, None)


# --- keys -----------------------------------------------------------------------------------------------------------


async def test_the_install_key_goes_only_to_the_hosts_configured_for_it(rig: Rig) -> None:
    await complete(rig, ask(llm(endpoint=OPENAI)))
    await complete(rig, ask(llm(endpoint="https://llm.attacker.example/v1/chat/completions")))
    assert [r.api_key for r in rig.provider.requests] == [INSTALL_KEY, None]


async def test_a_tenant_credential_named_in_auth_is_the_key_and_only_its_name_is_audited(rig: Rig) -> None:
    await rig.broker.put("openai-key", parse_credential_spec({"type": "api_key", "value": TENANT_KEY}))
    await complete(rig, ask(llm(credential="openai-key")))
    assert rig.provider.requests[0].api_key == TENANT_KEY
    (event,) = await rig.events()
    assert (event["action"], event["credential"], event["model"]) == ("llm.call", "openai-key", "gpt-4o")
    assert TENANT_KEY not in repr(event)


async def test_auth_none_sends_no_key_even_to_the_install_keys_host(rig: Rig) -> None:
    config = llm()
    config.auth.CopyFrom(agent_pb2.LlmAuth(type=common_pb2.AUTH_TYPE_NONE))
    await complete(rig, ask(config))
    assert rig.provider.requests[0].api_key is None


async def test_a_credential_that_is_not_stored_fails_the_turn_before_any_request(rig: Rig) -> None:
    with pytest.raises(FailedPrecondition, match="credential 'missing' not found"):
        await complete(rig, ask(llm(credential="missing")))
    assert rig.provider.requests == []
    (event,) = await rig.events()
    assert (event["outcome"], event["credential"]) == ("error", "missing")


async def test_the_key_never_appears_in_an_error_or_the_audit_even_when_the_api_echoes_it(rig: Rig) -> None:
    await rig.broker.put("openai-key", parse_credential_spec({"type": "api_key", "value": TENANT_KEY}))
    rig.provider.scripts["gpt-4o"] = [ProviderError(f"bad request: header was Bearer {TENANT_KEY}", status=400)]
    rig.provider.scripts["gpt-4o-mini"] = [
        ProviderError(f"Incorrect API key provided: {INSTALL_KEY[:6]}***{INSTALL_KEY[-4:]}", status=401)
    ]
    with pytest.raises(Unavailable) as caught:
        await complete(rig, ask(llm(credential="openai-key"), llm("gpt-4o-mini")))
    text = caught.value.message + repr(await rig.events())
    assert TENANT_KEY not in text and INSTALL_KEY[-4:] not in text
    assert "gpt-4o: bad request: header was Bearer [redacted]" in caught.value.message
    assert "gpt-4o-mini: the LLM refused the key (401)" in caught.value.message


# --- retries --------------------------------------------------------------------------------------------------------


async def test_transient_failures_are_retried_honouring_retry_after(rig: Rig) -> None:
    rig.provider.scripts["gpt-4o"] = [
        ProviderError("rate limited", status=429, transient=True, retry_after=0.03),
        ProviderError("overloaded", status=503, transient=True),
        Unavailable("connection reset"),
        turn("finally"),
    ]
    answer = await complete(rig, ask(), attempts=4)
    assert answer.message.content == "finally" and not answer.fallback_used
    assert rig.provider.models_asked() == ["gpt-4o"] * 4
    assert rig.waits[0] == 0.03 and len(rig.waits) == 3
    (event,) = await rig.events()  # one event for the LLM, whatever its attempts
    assert event["outcome"] == "ok"


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_a_refusal_is_not_retried(rig: Rig, status: int) -> None:
    rig.provider.scripts["gpt-4o"] = [ProviderError("no", status=status)]
    answer = await complete(rig, ask(llm(), llm("backup")), attempts=5)
    assert rig.provider.models_asked() == ["gpt-4o", "backup"]
    assert answer.fallback_used and rig.waits == []


async def test_no_retry_once_text_has_streamed(rig: Rig) -> None:
    rig.provider.scripts["gpt-4o"] = [Streams(["Hel", "lo"], ProviderError("stream cut", transient=True)), turn()]
    rig.provider.scripts["backup"] = [turn("from the backup")]
    seen: list[str] = []

    async def on_delta(text: str) -> None:
        seen.append(text)

    answer = await rig.caller(attempts=5).complete(ask(llm(), llm("backup"), stream=True), on_delta)
    assert rig.provider.models_asked() == ["gpt-4o", "backup"]
    assert (answer.message.content, answer.fallback_used, seen) == ("from the backup", True, ["Hel", "lo"])


async def test_a_model_that_does_not_answer_ends_at_the_deadline(rig: Rig) -> None:
    rig.provider.scripts["gpt-4o"] = [HANG]
    with pytest.raises(Unavailable) as caught:
        await complete(rig, ask(), deadline=0.3)
    assert "no answer within 0.3s" in caught.value.message
    assert rig.provider.requests[0].timeout <= 0.3


# --- fallbacks ------------------------------------------------------------------------------------------------------


async def test_fallbacks_are_tried_in_order_and_the_answer_says_which_answered(rig: Rig) -> None:
    rig.provider.scripts["gpt-4o"] = [ProviderError("down", status=503, transient=True)]
    rig.provider.scripts["second"] = [ProviderError("no such model", status=404)]
    rig.provider.scripts["third"] = [turn("third speaking", ToolCall("c1", "echo", "{}"), model="third-2026")]
    answer = await complete(rig, ask(llm(), llm("second"), llm("third"), llm("fourth")), attempts=2)
    assert rig.provider.models_asked() == ["gpt-4o", "gpt-4o", "second", "third"]
    assert (answer.model, answer.provider, answer.fallback_used) == ("third-2026", "openai", True)
    assert (answer.input_tokens, answer.output_tokens) == (12, 3)
    assert [(c.id, c.name, c.arguments_json) for c in answer.message.tool_calls] == [("c1", "echo", "{}")]
    assert [(e["model"], e["outcome"]) for e in await rig.events()] == [
        ("gpt-4o", "error"),
        ("second", "error"),
        ("third", "ok"),
    ]


async def test_when_no_llm_answers_the_error_names_each_and_why(rig: Rig) -> None:
    rig.provider.scripts["gpt-4o"] = [ProviderError("down", status=503, transient=True)]
    rig.provider.scripts["backup"] = [EgressRefused("egress refused: 10.0.0.7 is a private address")]
    with pytest.raises(Unavailable) as caught:
        await complete(rig, ask(llm(), llm("backup", endpoint="http://10.0.0.7/v1")), attempts=1)
    assert caught.value.message == (
        "no LLM answered: gpt-4o: down; backup: egress refused: 10.0.0.7 is a private address"
    )
    assert [e["outcome"] for e in await rig.events()] == ["error", "denied"]


async def test_a_single_llm_fails_with_its_own_error(rig: Rig) -> None:
    rig.provider.scripts["gpt-4o"] = [EgressRefused("egress refused: 10.0.0.7 is a private address")]
    with pytest.raises(PermissionDenied):
        await complete(rig, ask())


async def test_an_agent_without_an_llm_or_with_an_unknown_provider_is_refused(rig: Rig) -> None:
    with pytest.raises(FailedPrecondition, match="has no llm"):
        await rig.caller().complete(runtime_pb2.CompleteRequest(), None)
    with pytest.raises(FailedPrecondition, match="no provider"):
        await complete(rig, ask(agent_pb2.LlmConfig(llm_id="x", provider=agent_pb2.LLM_PROVIDER_ANTHROPIC)))
    assert rig.provider.requests == []


async def test_the_request_carries_the_conversation_tools_and_parameters(rig: Rig) -> None:
    config = llm()
    config.parameters.update({"temperature": 0.2, "max_tokens": 50})
    request = ask(config)
    request.messages.add(
        role=agent_pb2.MESSAGE_ROLE_ASSISTANT,
        tool_calls=[agent_pb2.ToolCall(id="c1", name="echo", arguments_json="{}")],
    )
    request.messages.add(role=agent_pb2.MESSAGE_ROLE_TOOL, tool_call_id="c1", name="echo", content="{}", is_error=True)
    request.tools.add(name="echo", description="says it back", input_schema_json=b'{"type": "object"}')
    await complete(rig, request)
    (sent,) = rig.provider.requests
    assert sent.system == "be brief" and sent.parameters == {"temperature": 0.2, "max_tokens": 50}
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert sent.messages[1].tool_calls == (ToolCall("c1", "echo", "{}"),)
    assert (sent.messages[2].tool_call_id, sent.messages[2].is_error) == ("c1", True)
    assert [(t.name, t.input_schema) for t in sent.tools] == [("echo", {"type": "object"})]


# --- metrics --------------------------------------------------------------------------------------------------------


async def test_metrics_count_per_provider_and_listed_model_and_every_other_model_is_other(rig: Rig) -> None:
    registry = CollectorRegistry()
    caller = rig.caller(metrics=LlmMetrics(registry, frozenset({"gpt-4o"})))
    rig.provider.scripts["gpt-4o"] = [ProviderError("down", status=503, transient=True)]
    rig.provider.scripts["acme-secret-finetune"] = [turn("hi")]
    await caller.complete(ask(llm("gpt-4o"), llm("acme-secret-finetune")), None)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("altan_llm_calls_total", provider="openai", model="gpt-4o", outcome="error") == 1
    assert value("altan_llm_calls_total", provider="openai", model="other", outcome="ok") == 1
    assert value("altan_llm_tokens_total", provider="openai", model="other", direction="input") == 12
    assert value("altan_llm_fallbacks_total", provider="openai", model="other") == 1
    assert value("altan_llm_call_duration_seconds_count", provider="openai", model="gpt-4o") == 1
    assert b"acme" not in generate_latest(registry)
