"""services.integrator.calls.ToolCaller: the binding check, the definition it reads (or skips), the credential it
injects, retries inside one deadline, the fallback tool, the audit event, and JSON bytes passed through untouched.

The Tool Service is a real ``grpc.aio`` server on 127.0.0.1:0 behind the services' own AuthInterceptor (tokens
verified, domain errors mapped to status codes as in production), serving the fakes below; the ToolCaller reaches
it through a real ToolClient. The CredentialBroker and AuditLog are real, on the in-process MemoryBackend.
What the caller waits between attempts is recorded by handing tenacity a sleep that notes each wait and then
really sleeps it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from tenacity import AsyncRetrying

from altan.api.credentials import parse_credential_spec
from altan.api.tools import SELF_CONTAINED_BUILTINS
from altan.auth import TokenVerifier
from altan.clients import ToolClient
from altan.errors import (
    AltanError,
    DeadlineExceeded,
    EgressRefused,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from altan.server import AuthInterceptor
from altan.store import MemoryBackend, TenantStore
from altan.v1 import common_pb2, runtime_pb2, runtime_pb2_grpc, tool_pb2, tool_pb2_grpc
from services.integrator import calls
from services.integrator.audit import AuditLog
from services.integrator.cache import ResponseCache
from services.integrator.calls import CallResult, ToolCaller
from services.integrator.credentials import CredentialBroker
from services.integrator.secrets import LocalSecretBackend
from tests.unit.test_server import as_caller, settings, token

CAP = 0.05  # seconds: the Retry-After cap of the default caller, so that every retry here is quick
HANG = "hang"  # in a script: ExecuteTool never answers
SECRET = "key-123-secret"
ARGS = b'{"q": "x"}'
Item = runtime_pb2.ExecuteToolResponse | AltanError | str


def answer(output: bytes = b'{"ok":true}', status: int = 200, **fields: Any) -> runtime_pb2.ExecuteToolResponse:
    return runtime_pb2.ExecuteToolResponse(output_json=output, http_status=status, **fields)


def custom(tool_id: str, auth: int = common_pb2.AUTH_TYPE_NONE, **fields: Any) -> tool_pb2.Tool:
    return tool_pb2.Tool(tool_id=tool_id, type=tool_pb2.TOOL_TYPE_CUSTOM, auth=auth, **fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Attempt:
    """One ExecuteTool request the Tool Service received."""

    tool_id: str
    arguments_json: bytes
    credential: runtime_pb2.InjectedCredential | None
    timeout_seconds: float


@dataclass
class FakeToolService(tool_pb2_grpc.ToolServiceServicer, runtime_pb2_grpc.ToolRuntimeServiceServicer):
    """The catalogue (``tools``) and the runtime: ExecuteTool answers each tool from its ``script``, one item an
    attempt (an answer, an error to raise, or HANG), the last item again once the script runs out; a tool without
    a script answers 200."""

    tools: dict[str, tool_pb2.Tool] = field(default_factory=dict)
    scripts: dict[str, list[Item]] = field(default_factory=dict)
    definitions_read: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def GetTool(self, request: tool_pb2.GetToolRequest, ctx: Any) -> tool_pb2.GetToolResponse:
        self.definitions_read.append(request.tool_id)
        if request.tool_id not in self.tools:
            raise NotFound(f"tool '{request.tool_id}' not found")
        return tool_pb2.GetToolResponse(tool=self.tools[request.tool_id])

    async def ListTools(self, request: tool_pb2.ListToolsRequest, ctx: Any) -> tool_pb2.ListToolsResponse:
        return tool_pb2.ListToolsResponse(tools=[self.tools[t] for t in request.tool_ids if t in self.tools])

    async def ExecuteTool(self, request: runtime_pb2.ExecuteToolRequest, ctx: Any) -> runtime_pb2.ExecuteToolResponse:
        credential = request.credential if request.HasField("credential") else None
        attempt = Attempt(request.tool_id, request.arguments_json, credential, request.timeout_seconds)
        self.attempts.append(attempt)
        script = self.scripts.get(request.tool_id) or [answer()]
        item = script[min(len(self.attempts_of(request.tool_id)), len(script)) - 1]
        if item == HANG:
            await self.stopping.wait()
            return answer()
        if isinstance(item, AltanError):
            raise item
        assert isinstance(item, runtime_pb2.ExecuteToolResponse)
        return item

    def attempts_of(self, tool_id: str) -> list[Attempt]:
        return [a for a in self.attempts if a.tool_id == tool_id]

    def executed(self) -> list[str]:
        return [a.tool_id for a in self.attempts]


@dataclass
class Rig:
    service: FakeToolService
    client: ToolClient
    broker: CredentialBroker
    audit: AuditLog
    waits: list[float]  # what the caller slept between attempts, in order
    cache: ResponseCache
    now: list[float]  # the embedded store's clock, for cache expiry and rate limits
    store: TenantStore

    def caller(self, *, attempts: int = 3, deadline: float = 10.0, cap: float = CAP) -> ToolCaller:
        return ToolCaller(
            self.client,
            self.broker,
            self.audit,
            attempts=attempts,
            deadline_seconds=deadline,
            retry_after_cap=cap,
            cache=self.cache,
            limits=self.store,
        )

    async def events(self, task_id: str = "") -> list[dict[str, Any]]:
        return await self.audit.query(task_id, 1000)


@pytest.fixture
async def rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    waits: list[float] = []

    async def noted_sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    monkeypatch.setattr(calls, "AsyncRetrying", functools.partial(AsyncRetrying, sleep=noted_sleep))
    service = FakeToolService()
    server = grpc.aio.server(interceptors=[AuthInterceptor(TokenVerifier(settings()))])
    tool_pb2_grpc.add_ToolServiceServicer_to_server(service, server)
    runtime_pb2_grpc.add_ToolRuntimeServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = ToolClient(f"127.0.0.1:{port}", 10)
    now = [1000.0]
    store = TenantStore(MemoryBackend(clock=lambda: now[0]), "integrator")
    broker = CredentialBroker(store, LocalSecretBackend(store, os.urandom(32)))
    try:
        cache = ResponseCache(store, max_entry_bytes=1000)
        yield Rig(service, client, broker, AuditLog(store), waits, cache, now, store)
    finally:
        service.stopping.set()
        await client.aclose()
        await server.stop(0)


async def store_api_key(rig: Rig, name: str = "crm-key", **fields: Any) -> None:
    spec = {"type": "api_key", "value": SECRET, "header": "X-Api-Key", "prefix": "Key "} | fields
    await rig.broker.put(name, parse_credential_spec(spec))


def caller_as(tenant: str = "acme", role: str = "admin") -> None:
    as_caller(token(tenant=tenant, sub="alice", role=role))


# --- binding --------------------------------------------------------------------------------------------------------


async def test_a_tool_not_bound_to_the_agent_is_refused_and_audited_as_denied(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    with pytest.raises(PermissionDenied) as caught:
        await rig.caller().invoke("crm", ARGS, agent_id="agt_1", bound=["search"], task_id="tsk_1")
    assert caught.value.message == "tool 'crm' is not bound to agent 'agt_1'"
    assert (rig.service.definitions_read, rig.service.attempts) == ([], [])
    (event,) = await rig.events()
    assert (event["tool_id"], event["outcome"], event["reason"], event["task_id"]) == (
        "crm",
        "denied",
        "tool 'crm' is not bound to agent 'agt_1'",
        "tsk_1",
    )


async def test_a_bound_tool_runs_for_its_agent_and_a_direct_call_needs_no_binding(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    for_agent = await rig.caller().invoke("crm", ARGS, agent_id="agt_1", bound=["search", "crm"])
    direct = await rig.caller().invoke("crm", ARGS)
    assert for_agent == direct == CallResult(b'{"ok":true}', 200)
    assert rig.service.executed() == ["crm", "crm"]


async def test_the_fallback_of_a_bound_tool_must_be_bound_too(rig: Rig) -> None:
    caller_as()
    rig.service.tools.update(crm=custom("crm", fallback_tool_id="backup"), backup=custom("backup"))
    rig.service.scripts["crm"] = [answer(status=500)]
    with pytest.raises(PermissionDenied, match="tool 'backup' is not bound to agent 'agt_1'"):
        await rig.caller().invoke("crm", ARGS, agent_id="agt_1", bound=["crm"])
    assert rig.service.executed() == ["crm"]
    assert [(e["tool_id"], e["outcome"]) for e in await rig.events()] == [("crm", "error"), ("backup", "denied")]


async def test_a_task_call_of_a_tool_that_requires_approval_runs_nothing_until_approved(rig: Rig) -> None:
    """The gate reads the definition the call reads anyway: not approved, nothing is called, audited or resolved,
    and the answer says so; approved, the call runs. A direct call (no gate) runs as before; the fallback of an
    approved call is not gated (the step's tool was approved)."""
    caller_as()
    rig.service.tools.update(
        send=custom("send", requires_approval=True, fallback_tool_id="backup"),
        backup=custom("backup", requires_approval=True),
        crm=custom("crm"),
    )
    rig.service.scripts["send"] = [answer(status=503)]
    gated = await rig.caller().invoke("send", ARGS, task_id="tsk_1", step_id="s1", approval_gate=True)
    assert gated == CallResult(b"", 0, approval_required=True)
    assert rig.service.executed() == [] and await rig.events() == []
    assert await rig.caller().invoke("crm", ARGS, task_id="tsk_1", step_id="s2", approval_gate=True) == CallResult(
        b'{"ok":true}', 200
    )
    approved = await rig.caller(attempts=1).invoke("send", ARGS, task_id="tsk_1", step_id="s1")
    assert approved == CallResult(b'{"ok":true}', 200)  # the fallback's answer, run without asking again
    assert rig.service.executed() == ["crm", "send", "backup"]


# --- the definition -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool_id", sorted(SELF_CONTAINED_BUILTINS))
async def test_self_contained_built_ins_run_without_reading_their_definition(rig: Rig, tool_id: str) -> None:
    caller_as()
    await store_api_key(rig)
    result = await rig.caller().invoke(tool_id, b'{"credential": "crm-key"}')
    assert result == CallResult(b'{"ok":true}', 200)
    assert rig.service.definitions_read == []
    (attempt,) = rig.service.attempts
    assert (attempt.tool_id, attempt.arguments_json, attempt.credential) == (
        tool_id,
        b'{"credential": "crm-key"}',
        None,
    )


async def test_other_tools_are_read_first_and_an_unknown_one_is_denied(rig: Rig) -> None:
    caller_as()
    rig.service.tools.update(http_request=tool_pb2.Tool(tool_id="http_request", type=tool_pb2.TOOL_TYPE_BUILTIN))
    await rig.caller().invoke("http_request", b'{"url": "https://api.example.com/"}')
    with pytest.raises(NotFound, match="tool 'gone' not found"):
        await rig.caller().invoke("gone", ARGS)
    assert rig.service.definitions_read == ["http_request", "gone"]
    assert rig.service.executed() == ["http_request"]
    assert [(e["tool_id"], e["outcome"]) for e in await rig.events()] == [("http_request", "ok"), ("gone", "denied")]


# --- the credential -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [common_pb2.AUTH_TYPE_API_KEY, common_pb2.AUTH_TYPE_OAUTH2])
async def test_a_custom_tool_with_auth_gets_its_own_credential(rig: Rig, auth: int) -> None:
    caller_as()
    await store_api_key(rig)
    rig.service.tools["crm"] = custom("crm", auth, credential="crm-key")
    await rig.caller().invoke("crm", b'{"credential": "something-else"}')
    (attempt,) = rig.service.attempts
    assert attempt.credential == runtime_pb2.InjectedCredential(
        name="crm-key", header="X-Api-Key", prefix="Key ", value=SECRET
    )
    (event,) = await rig.events()
    assert event["credential"] == "crm-key"
    assert SECRET not in repr(event)


@pytest.mark.parametrize("auth", [common_pb2.AUTH_TYPE_NONE, common_pb2.AUTH_TYPE_UNSPECIFIED])
async def test_a_custom_tool_without_auth_gets_no_credential(rig: Rig, auth: int) -> None:
    caller_as()
    await store_api_key(rig)
    rig.service.tools["crm"] = custom("crm", auth, credential="crm-key")
    await rig.caller().invoke("crm", b'{"credential": "crm-key"}')  # only http_request reads its arguments
    assert rig.service.attempts[0].credential is None
    assert (await rig.events())[0]["credential"] == ""


async def test_http_request_gets_the_credential_its_arguments_name_and_none_otherwise(rig: Rig) -> None:
    caller_as()
    await store_api_key(rig, "github", header="Authorization", prefix="Bearer ", hosts=["api.github.com"])
    rig.service.tools["http_request"] = tool_pb2.Tool(tool_id="http_request", type=tool_pb2.TOOL_TYPE_BUILTIN)
    named = b'{"url": "https://api.github.com/user", "credential": "github"}'
    await rig.caller().invoke("http_request", named)
    await rig.caller().invoke("http_request", b'{"url": "https://api.github.com/user"}')
    await rig.caller().invoke("http_request", b'{"url": "https://api.github.com/user", "credential": 7}')
    with_it, *without = rig.service.attempts
    assert with_it.credential == runtime_pb2.InjectedCredential(
        name="github", header="Authorization", prefix="Bearer ", value=SECRET, hosts=["api.github.com"]
    )
    assert [a.credential for a in without] == [None, None]
    assert [e["credential"] for e in await rig.events()] == ["github", "", ""]


async def test_http_request_to_a_host_the_credential_does_not_list_is_denied_before_it_runs(rig: Rig) -> None:
    caller_as()
    await store_api_key(rig, "github", header="Authorization", prefix="Bearer ", hosts=["api.github.com"])
    rig.service.tools["http_request"] = tool_pb2.Tool(tool_id="http_request", type=tool_pb2.TOOL_TYPE_BUILTIN)
    with pytest.raises(PermissionDenied, match="credential 'github' may not be sent to that URL"):
        await rig.caller().invoke("http_request", b'{"url": "https://requestbin.example/x", "credential": "github"}')
    assert rig.service.attempts == []  # the secret never left the integrator
    (event,) = await rig.events()
    assert (event["outcome"], event["credential"]) == ("denied", "github")
    assert SECRET not in json.dumps(event)


async def test_a_credential_that_is_not_stored_fails_the_call_before_it_runs(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm", common_pb2.AUTH_TYPE_API_KEY, credential="crm-key")
    with pytest.raises(FailedPrecondition, match="credential 'crm-key' not found"):
        await rig.caller().invoke("crm", ARGS)
    assert rig.service.attempts == []
    (event,) = await rig.events()
    assert (event["outcome"], event["credential"], event["reason"]) == (
        "error",
        "crm-key",
        "credential 'crm-key' not found",
    )


# --- retries --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_transient_answers_are_retried(rig: Rig, status: int) -> None:
    caller_as()
    await store_api_key(rig)
    rig.service.tools["crm"] = custom("crm", common_pb2.AUTH_TYPE_API_KEY, credential="crm-key")
    rig.service.scripts["crm"] = [answer(b'{"busy":1}', status), answer(b'{"busy":2}', status), answer(b'{"done":3}')]
    result = await rig.caller(attempts=3).invoke("crm", ARGS)
    assert result == CallResult(b'{"done":3}', 200)
    attempts = rig.service.attempts
    assert len(attempts) == 3
    assert {(a.arguments_json, a.credential.value if a.credential else None) for a in attempts} == {(ARGS, SECRET)}
    assert len(rig.waits) == 2


async def test_an_unreachable_tool_service_is_retried(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    rig.service.scripts["crm"] = [Unavailable("connection refused"), answer()]
    assert await rig.caller().invoke("crm", ARGS) == CallResult(b'{"ok":true}', 200)
    assert rig.service.executed() == ["crm", "crm"]


@pytest.mark.parametrize(
    "item",
    [answer(status=500), answer(status=404), answer(status=400)],
    ids=["500", "404", "400"],
)
async def test_other_answers_stand_at_once(rig: Rig, item: runtime_pb2.ExecuteToolResponse) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    rig.service.scripts["crm"] = [item, answer()]
    result = await rig.caller().invoke("crm", ARGS)
    assert result == CallResult(item.output_json, item.http_status)
    assert (rig.service.executed(), rig.waits) == (["crm"], [])
    (event,) = await rig.events()
    assert (event["outcome"], event["reason"]) == ("error", f"HTTP {item.http_status}")


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (InvalidArgument("arguments.q: bad"), InvalidArgument),
        (FailedPrecondition("too big"), FailedPrecondition),
        (EgressRefused("egress refused", target="x:1"), PermissionDenied),  # it crosses the wire as its base
    ],
    ids=["invalid", "precondition", "egress"],
)
async def test_errors_that_are_not_transient_are_not_retried(
    rig: Rig, error: AltanError, raised: type[AltanError]
) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    rig.service.scripts["crm"] = [error, answer()]
    with pytest.raises(raised) as caught:
        await rig.caller().invoke("crm", ARGS)
    assert caught.value.message == error.message
    assert rig.service.executed() == ["crm"]


async def test_retry_after_is_honoured_up_to_the_cap(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    rig.service.scripts["crm"] = [
        answer(status=429, retry_after_seconds=0.03),
        answer(status=503, retry_after_seconds=3600),
        answer(status=503),  # no Retry-After: backoff, never past the cap either
        answer(),
    ]
    result = await rig.caller(attempts=4, cap=0.1).invoke("crm", ARGS)
    assert result.http_status == 200
    assert rig.waits[:2] == [0.03, 0.1]
    assert 0 < rig.waits[2] <= 0.1
    assert len(rig.waits) == 3


async def test_after_the_last_attempt_the_third_partys_last_answer_stands(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm", fallback_tool_id="")
    rig.service.scripts["crm"] = [answer(b'{"try":1}', 503), answer(b'{"try":2}', 503), answer(b'{"try":3}', 429)]
    result = await rig.caller(attempts=3).invoke("crm", ARGS)
    assert result == CallResult(b'{"try":3}', 429)
    assert len(rig.service.attempts) == 3
    (event,) = await rig.events()
    assert (event["outcome"], event["reason"]) == ("error", "HTTP 429")


async def test_a_tool_service_still_unreachable_after_the_last_attempt_is_an_error(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    rig.service.scripts["crm"] = [Unavailable("connection refused")]
    with pytest.raises(Unavailable, match="connection refused"):
        await rig.caller(attempts=3).invoke("crm", ARGS)
    assert len(rig.service.attempts) == 3
    (event,) = await rig.events()
    assert (event["outcome"], event["reason"]) == ("error", "connection refused")


async def test_every_attempt_fits_in_one_deadline(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    rig.service.scripts["crm"] = [answer(status=503)]
    try:
        result = await rig.caller(attempts=1000, deadline=0.5, cap=0.02).invoke("crm", ARGS)
        assert result.http_status == 503  # the deadline ended the retries, and the last answer stands
    except Unavailable:
        pass  # what it ends with today, most often: see test_a_retry_after_beyond_the_deadline_is_not_waited
    budgets = [a.timeout_seconds for a in rig.service.attempts]
    assert 1 < len(budgets) < 1000
    # Each attempt tells the Tool Service what is left of the one deadline, never more.
    assert all(0 < budget <= 0.5 for budget in budgets)
    assert all(earlier > later for earlier, later in itertools.pairwise(budgets))


async def test_a_tool_service_that_does_not_answer_ends_the_call_at_the_deadline(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    rig.service.scripts["crm"] = [HANG]
    with pytest.raises(DeadlineExceeded):
        await rig.caller(deadline=0.3).invoke("crm", ARGS)
    (attempt,) = rig.service.attempts
    assert 0 < attempt.timeout_seconds <= 0.3
    assert (await rig.events())[0]["outcome"] == "error"


async def test_a_retry_after_beyond_the_deadline_is_not_waited(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    rig.service.scripts["crm"] = [answer(b'{"busy":true}', 503, retry_after_seconds=1.5), answer()]
    result = await rig.caller(attempts=3, deadline=1.0, cap=10).invoke("crm", ARGS)
    assert result == CallResult(b'{"busy":true}', 503)
    assert all(wait < 1.0 for wait in rig.waits)


# --- the fallback ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("primary", "primary_attempts"),
    [(answer(status=500), 1), (answer(status=503), 2), (Unavailable("connection refused"), 2)],
    ids=["5xx", "transient-to-the-end", "unreachable"],
)
async def test_the_fallback_runs_once_when_the_primary_fails_for_good(
    rig: Rig, primary: Item, primary_attempts: int
) -> None:
    caller_as()
    rig.service.tools.update(crm=custom("crm", fallback_tool_id="backup"), backup=custom("backup"))
    rig.service.scripts.update(crm=[primary], backup=[answer(b'{"from":"backup"}')])
    args = b'{"q":  "\\u00fc", "n": 12345678901234567890}'
    result = await rig.caller(attempts=2).invoke("crm", args, task_id="tsk_1")
    assert result == CallResult(b'{"from":"backup"}', 200)
    backup = rig.service.attempts_of("backup")
    assert [a.arguments_json for a in backup] == [args]
    assert len(rig.service.attempts_of("crm")) == primary_attempts
    assert [(e["tool_id"], e["outcome"], e["task_id"]) for e in await rig.events()] == [
        ("crm", "error", "tsk_1"),
        ("backup", "ok", "tsk_1"),
    ]


async def test_a_fallback_is_not_followed_further(rig: Rig) -> None:
    caller_as()
    rig.service.tools.update(
        crm=custom("crm", fallback_tool_id="backup"),
        backup=custom("backup", fallback_tool_id="third"),
        third=custom("third"),
    )
    rig.service.scripts.update(crm=[answer(status=500)], backup=[answer(b'{"backup":"down"}', 502)])
    result = await rig.caller(attempts=2).invoke("crm", ARGS)
    assert result == CallResult(b'{"backup":"down"}', 502)
    assert "third" not in rig.service.definitions_read + rig.service.executed()


@pytest.mark.parametrize(
    "primary",
    [answer(), answer(status=404), InvalidArgument("arguments: bad")],
    ids=["ok", "4xx", "invalid-arguments"],
)
async def test_no_fallback_when_the_primary_answered_or_refused(rig: Rig, primary: Item) -> None:
    caller_as()
    rig.service.tools.update(crm=custom("crm", fallback_tool_id="backup"), backup=custom("backup"))
    rig.service.scripts["crm"] = [primary]
    if isinstance(primary, AltanError):
        with pytest.raises(type(primary), match=primary.message):
            await rig.caller().invoke("crm", ARGS)
    else:
        assert (await rig.caller().invoke("crm", ARGS)).http_status == primary.http_status
    assert rig.service.executed() == ["crm"]
    assert "backup" not in rig.service.definitions_read


# --- audit and bytes ------------------------------------------------------------------------------------------------


async def test_one_audit_event_per_call_says_who_what_where_and_how_long(rig: Rig) -> None:
    caller_as(tenant="acme")
    await store_api_key(rig)
    rig.service.tools["crm"] = custom("crm", common_pb2.AUTH_TYPE_API_KEY, credential="crm-key")
    rig.service.scripts["crm"] = [
        answer(status=503, retry_after_seconds=0.04, target="api.crm.example:443"),
        answer(target="api.crm.example:443"),
    ]
    await rig.caller().invoke("crm", ARGS, task_id="tsk_9")
    events = await rig.events()
    assert events == await rig.events("tsk_9")  # and the task's own trail holds it too
    (event,) = events
    assert {k: event[k] for k in ("tenant_id", "user", "action", "tool_id", "task_id", "target", "outcome")} == {
        "tenant_id": "acme",
        "user": "alice",
        "action": "tool.invoke",
        "tool_id": "crm",
        "task_id": "tsk_9",
        "target": "api.crm.example:443",
        "outcome": "ok",
    }
    assert (event["reason"], event["credential"]) == ("", "crm-key")
    assert rig.waits == [0.04]
    assert event["latency_ms"] >= 40  # the whole call, the wait between its attempts included


async def test_an_egress_refusal_is_audited_as_denied_with_its_target(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    rig.service.scripts["crm"] = [EgressRefused("egress refused: 10.0.0.7 is a private address", target="10.0.0.7:80")]
    with pytest.raises(PermissionDenied) as caught:
        await rig.caller().invoke("crm", ARGS)
    assert caught.value.target == "10.0.0.7:80"  # type: ignore[attr-defined]
    (event,) = await rig.events()
    assert (event["outcome"], event["target"], event["reason"]) == (
        "denied",
        "10.0.0.7:80",
        "egress refused: 10.0.0.7 is a private address",
    )


async def test_arguments_and_outputs_pass_through_as_the_json_bytes_they_arrived_in(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm")
    arguments = b'{ "z":1,"a" : [1.0, 1e2, "\\u00e9", "\xc3\xa9"], "big": 12345678901234567890 }'
    output = b'{"b":  2, "a":1.50, "id": 9007199254740993}'
    rig.service.scripts["crm"] = [answer(output)]
    result = await rig.caller().invoke("crm", arguments)
    assert rig.service.attempts[0].arguments_json == arguments
    assert result.output_json == output


async def test_describe_answers_the_tools_that_exist_and_the_ids_that_do_not(rig: Rig) -> None:
    caller_as()
    rig.service.tools.update(crm=custom("crm"), search=custom("search"))
    found, missing = await rig.caller().describe(["search", "nope", "crm", "search", "gone"])
    assert [t.tool_id for t in found] == ["search", "crm"]
    assert missing == ["nope", "gone"]


# --- response cache -------------------------------------------------------------------------------------------------


async def test_a_cacheable_tool_answers_identical_arguments_from_the_tenants_cache(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm", cacheable_seconds=60)
    rig.service.scripts["crm"] = [answer(b'{"n":1}'), answer(b'{"n":2}'), answer(b'{"n":3}'), answer(b'{"n":4}')]
    first = await rig.caller().invoke("crm", b'{"q": "x", "page": 1}')
    again = await rig.caller().invoke("crm", b'{"page":1,"q":"x"}')  # the same arguments, written differently
    assert (first, again) == (CallResult(b'{"n":1}', 200), CallResult(b'{"n":1}', 200, cached=True))
    assert (await rig.caller().invoke("crm", b'{"q": "y", "page": 1}')).output_json == b'{"n":2}'
    assert len(rig.service.attempts) == 2
    caller_as("globex")  # never shared between tenants
    assert (await rig.caller().invoke("crm", b'{"q": "x", "page": 1}')).cached is False
    caller_as()
    rig.service.tools["crm"] = custom("crm", cacheable_seconds=60, description="changed")  # a new definition
    assert (await rig.caller().invoke("crm", b'{"q": "x", "page": 1}')) == CallResult(b'{"n":4}', 200)
    rig.now[0] += 61  # past cacheable_seconds
    assert (await rig.caller().invoke("crm", b'{"q": "x", "page": 1}')).cached is False
    reasons = [e["reason"] for e in await rig.events()]
    assert reasons.count("answered from the cache") == 1


async def test_failed_outsized_and_uncacheable_answers_are_never_cached(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm", cacheable_seconds=60)
    rig.service.tools["plain"] = custom("plain")
    rig.service.scripts["crm"] = [answer(status=404), answer(b'"' + b"x" * 2000 + b'"'), answer()]
    for _ in range(3):
        assert (await rig.caller().invoke("crm", ARGS)).cached is False
        assert (await rig.caller().invoke("plain", ARGS)).cached is False
    assert (await rig.caller().invoke("crm", ARGS)).cached is True  # the third answer was the first one kept
    assert len(rig.service.attempts_of("crm")) == 3 and len(rig.service.attempts_of("plain")) == 3


# --- rate limits ----------------------------------------------------------------------------------------------------


async def test_a_direct_call_over_the_tools_rate_limit_is_refused_with_the_wait(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm", rate_limit=tool_pb2.RateLimit(requests=2, per_seconds=60))
    for _ in range(2):
        await rig.caller().invoke("crm", ARGS)
    with pytest.raises(ResourceExhausted, match=r"tool 'crm' is over its rate limit of 2 calls per 60s") as caught:
        await rig.caller().invoke("crm", ARGS)
    assert caught.value.retry_after == pytest.approx(30)
    assert len(rig.service.attempts) == 2  # the third party never saw the third call
    caller_as("globex")
    await rig.caller().invoke("crm", ARGS)  # per tenant
    caller_as()
    rig.now[0] += 30
    await rig.caller().invoke("crm", ARGS)
    assert len(rig.service.attempts) == 4
    (refused,) = [e for e in await rig.events() if e["outcome"] != "ok"]
    assert "over its rate limit" in refused["reason"]


async def test_cache_hits_do_not_spend_the_rate_limit(rig: Rig) -> None:
    caller_as()
    limit = tool_pb2.RateLimit(requests=1, per_seconds=60)
    rig.service.tools["crm"] = custom("crm", rate_limit=limit, cacheable_seconds=60)
    for _ in range(3):
        await rig.caller().invoke("crm", ARGS)
    assert len(rig.service.attempts) == 1


# --- a host that asked to wait --------------------------------------------------------------------------------------


async def test_a_host_that_asked_to_wait_is_left_alone_for_that_long(rig: Rig) -> None:
    caller_as()
    endpoint = "https://api.example.com/v1/things"
    rig.service.tools["crm"] = custom("crm", endpoint=endpoint)
    rig.service.tools["other"] = custom("other", endpoint="https://api.example.com:8443/")
    target = "api.example.com:443"
    rig.service.scripts["crm"] = [answer(status=429, retry_after_seconds=20, target=target), answer(target=target)]
    assert (await rig.caller(attempts=1).invoke("crm", ARGS)).http_status == 429
    with pytest.raises(ResourceExhausted, match=r"api\.example\.com:443 asked to wait") as caught:
        await rig.caller().invoke("crm", ARGS)
    assert caught.value.retry_after is not None and 19 < caught.value.retry_after <= 20
    http_request = b'{"url": "https://API.example.com/other"}'  # any call to that host, by any tool
    rig.service.tools["http_request"] = tool_pb2.Tool(tool_id="http_request", type=tool_pb2.TOOL_TYPE_BUILTIN)
    with pytest.raises(ResourceExhausted):
        await rig.caller().invoke("http_request", http_request)
    await rig.caller().invoke("other", ARGS)  # another port is another host
    caller_as("globex")
    await rig.caller().invoke("crm", ARGS)  # another tenant was not asked
    assert rig.service.executed() == ["crm", "other", "crm"]
    caller_as()
    rig.now[0] += 21  # the hold has expired
    assert (await rig.caller().invoke("crm", ARGS)).http_status == 200


async def test_a_task_step_waits_out_a_short_hold_instead_of_failing(rig: Rig) -> None:
    caller_as()
    rig.service.tools["crm"] = custom("crm", endpoint="https://api.example.com/")
    target = "api.example.com:443"
    rig.service.scripts["crm"] = [answer(retry_after_seconds=0.2, target=target), answer(target=target)]
    await rig.caller().invoke("crm", ARGS)  # a 200 that says the rate limit is used up for 0.2 s
    started = time.monotonic()
    assert (await rig.caller().invoke("crm", ARGS, task_id="tsk_1")).http_status == 200
    assert time.monotonic() - started >= 0.15
    assert len(rig.service.attempts_of("crm")) == 2
