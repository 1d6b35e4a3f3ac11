"""services.integrator.audit_sink and the fail-closed audit trail: audit events as Cloud Logging entries, written by
the real google-cloud-logging asyncio client over a real gRPC channel to an in-process fake of the Logging API
(tests/fakes/google_cloud.py); and a tool or LLM call whose audit entry cannot be written does not run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.logging.type import log_severity_pb2

from altan.errors import Unavailable
from altan.store import MemoryBackend, TenantStore
from services.integrator.audit import AuditLog, open_audit_sink
from services.integrator.audit_sink import CloudLoggingSink
from services.integrator.credentials import CredentialBroker
from services.integrator.secrets import LocalSecretBackend
from tests.fakes.google_cloud import FakeGoogleCloud
from tests.unit import test_model_caller as llm_rig
from tests.unit.test_secret_manager import gcp_settings
from tests.unit.test_tool_caller import ARGS, SECRET, Rig, caller_as, custom, rig, store_api_key
from tests.unit.test_tool_caller import common_pb2 as common

__all__ = ["rig"]  # the ToolCaller's rig fixture, with the sink's AuditLog swapped in


@pytest.fixture
def google() -> Iterator[FakeGoogleCloud]:
    with FakeGoogleCloud() as fake:
        yield fake


@pytest.fixture
async def sink(google: FakeGoogleCloud) -> AsyncIterator[CloudLoggingSink]:
    opened = open_audit_sink(gcp_settings(google.address, secret_backend="local", audit_sink="gcp"))
    assert isinstance(opened, CloudLoggingSink)
    yield opened
    await opened.aclose()


@pytest.fixture
def audited(rig: Rig, sink: CloudLoggingSink) -> Rig:
    rig.audit = AuditLog(rig.store, sink=sink)
    return rig


async def test_a_call_writes_its_intent_then_its_outcome_as_entries_of_the_audit_log(
    audited: Rig, google: FakeGoogleCloud
) -> None:
    caller_as("acme")
    await store_api_key(audited)
    audited.service.tools["crm"] = custom("crm", auth=common.AUTH_TYPE_API_KEY, credential="crm-key")
    await audited.caller().invoke("crm", ARGS, task_id="tsk_1")
    started, finished = google.logging.entries
    for entry in (started, finished):
        assert entry.log_name == "projects/acme-prod/logs/altan-audit"
        assert entry.resource.type == "global" and entry.resource.labels["project_id"] == "acme-prod"
        assert dict(entry.labels) == {"altan_tenant": "acme", "altan_action": "tool.invoke"}
        assert entry.operation.id == started.operation.id and entry.operation.producer == "altan.io/integrator"
        assert entry.insert_id and entry.timestamp
    assert (started.operation.first, started.operation.last, finished.operation.first, finished.operation.last) == (
        True,
        False,
        False,
        True,
    )
    intent, outcome = google.logging.payloads()
    assert (intent["outcome"], intent["tool_id"], intent["credential"], intent["task_id"]) == (
        "started",
        "crm",
        "crm-key",
        "tsk_1",
    )
    (shown,) = await audited.events("tsk_1")
    assert outcome == shown | {"time": outcome["time"], "latency_ms": outcome["latency_ms"]}
    assert outcome["outcome"] == "ok" and SECRET not in str(google.logging.payloads())


async def test_refusals_and_failures_carry_their_severity(audited: Rig, google: FakeGoogleCloud) -> None:
    caller_as()
    audited.service.tools["crm"] = custom("crm")
    with pytest.raises(Exception, match="not bound"):
        await audited.caller().invoke("crm", ARGS, agent_id="agt_1", bound=[])
    (entry,) = google.logging.entries  # refused before any call: one entry, first and last
    assert entry.severity == log_severity_pb2.WARNING and entry.operation.first and entry.operation.last


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE])
async def test_a_tool_call_whose_audit_cannot_be_written_does_not_run(
    audited: Rig, google: FakeGoogleCloud, code: grpc.StatusCode
) -> None:
    caller_as()
    await store_api_key(audited)
    audited.service.tools["crm"] = custom("crm", auth=common.AUTH_TYPE_API_KEY, credential="crm-key")
    google.logging.fail["WriteLogEntries"] = code
    with pytest.raises(Unavailable) as caught:
        await audited.caller().invoke("crm", ARGS)
    assert caught.value.message.startswith("the audit trail cannot be written, so the call was not run")
    assert audited.service.attempts == [], "the tool never ran"
    assert google.logging.entries == []
    (event,) = await audited.events()  # the state store's trail says why
    assert event["outcome"] == "error" and "audit trail cannot be written" in event["reason"]


async def test_a_stopped_logging_endpoint_stops_calls_and_they_run_again_when_it_is_back(
    audited: Rig, google: FakeGoogleCloud
) -> None:
    caller_as()
    google.stop()
    with pytest.raises(Unavailable, match="Google Cloud is unreachable"):
        await audited.caller().invoke("json_extract", b'{"data": {}, "path": "x"}')
    assert audited.service.attempts == []
    google.start()
    await audited.caller().invoke("json_extract", b'{"data": {}, "path": "x"}')
    assert audited.service.executed() == ["json_extract"]


async def test_an_outcome_the_sink_refuses_after_the_call_is_logged_not_raised(
    audited: Rig, google: FakeGoogleCloud, caplog: pytest.LogCaptureFixture
) -> None:
    caller_as()
    audited.service.tools["crm"] = custom("crm")
    calls = 0

    real_write = audited.audit._sink.write  # type: ignore[union-attr]

    async def refuse_the_second(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            google.logging.fail["WriteLogEntries"] = grpc.StatusCode.UNAVAILABLE
        await real_write(*args, **kwargs)  # type: ignore[arg-type]

    audited.audit._sink.write = refuse_the_second  # type: ignore[method-assign,union-attr]
    result = await audited.caller().invoke("crm", ARGS)
    assert result.http_status == 200 and audited.service.executed() == ["crm"]
    assert [p["outcome"] for p in google.logging.payloads()] == ["started"]
    assert "audit outcome not written to the sink (its intent was)" in caplog.text


async def test_an_llm_call_whose_audit_cannot_be_written_does_not_run(
    sink: CloudLoggingSink, google: FakeGoogleCloud
) -> None:
    llm_rig.caller_as(tenant="acme")
    store = TenantStore(MemoryBackend(), "integrator")
    rig = llm_rig.Rig(
        llm_rig.ScriptedProvider(),
        CredentialBroker(store, LocalSecretBackend(store, os.urandom(32))),
        AuditLog(store, sink=sink),
        [],
    )
    await llm_rig.complete(rig, llm_rig.ask())
    assert [(p["action"], p["outcome"]) for p in google.logging.payloads()] == [
        ("llm.call", "started"),
        ("llm.call", "ok"),
    ]
    google.logging.fail["WriteLogEntries"] = grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(Unavailable, match=r"audit trail cannot be written.*roles/logging.logWriter"):
        await llm_rig.complete(rig, llm_rig.ask())
    assert len(rig.provider.requests) == 1, "the model was not called the second time"


async def test_without_a_sink_the_state_store_alone_is_written_ahead(rig: Rig) -> None:
    caller_as()
    await rig.caller().invoke("json_extract", b'{"data": {}, "path": "x"}')
    assert [e["outcome"] for e in await rig.store.tail("audit:started", 10)] == ["started"]
    assert [e["outcome"] for e in await rig.events()] == ["ok"]
