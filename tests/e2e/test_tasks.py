"""Structured tasks end to end: validation at submit, parallel execution, references, events, cancel, audit."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack


def _agent(api: httpx.Client, tools: list[str]) -> str:
    answer = api.post("/v1/agents", json={"name": "planner", "tools": tools})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _events(api: httpx.Client, task_id: str, **headers: str) -> list[dict[str, Any]]:
    """Reads the SSE stream to its end (the server closes it after the terminal event)."""
    events = []
    with api.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers, timeout=30) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def _finished(api: httpx.Client, task_id: str) -> dict[str, Any]:
    _events(api, task_id)  # returns once the terminal event was sent
    task: dict[str, Any] = api.get(f"/v1/tasks/{task_id}").json()
    return task


def test_independent_steps_run_in_parallel(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    plan = {
        "plan": [
            {"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/sleep/1"}},
            {"id": "s2", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/sleep/1"}},
            {
                "id": "s3",
                "tool": "text_template",
                "depends_on": ["s1", "s2"],
                "arguments": {
                    "template": "{{ a }}+{{ b }}",
                    "values": {"a": "${s1.output.slept}", "b": "${s2.output.slept}"},
                },
            },
        ]
    }
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["http_request", "text_template"])
        started = time.monotonic()
        submitted = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan})
        assert submitted.status_code == 202
        assert submitted.json()["status"] == "queued"
        task = _finished(api, submitted.json()["task_id"])
        elapsed = time.monotonic() - started
    assert task["status"] == "succeeded", task
    assert elapsed < 1.9, f"two 1 s steps and a dependent one took {elapsed:.2f}s: not parallel"
    steps = {s["id"]: s for s in task["steps"]}
    assert steps["s3"]["output"] == {"text": "1.0+1.0"}
    assert all(s["status"] == "succeeded" and s["duration_ms"] >= 0 for s in steps.values())
    assert steps["s1"]["duration_ms"] >= 900 and steps["s3"]["started_at"] >= steps["s1"]["finished_at"]
    assert task["result"]["s3"] == {"text": "1.0+1.0"}
    assert task["usage"]["tool_calls"] == 3


def test_references_keep_their_type(stack: Stack, tenant: str) -> None:
    plan = {
        "plan": [
            {
                "id": "s1",
                "tool": "json_extract",
                "arguments": {"data": {"items": [{"n": 41}, {"n": 42}]}, "path": "items"},
            },
            {
                "id": "s2",
                "tool": "json_extract",
                "depends_on": ["s1"],
                "arguments": {"data": {"list": "${s1.output.value}"}, "path": "list[1].n"},
            },
            {
                "id": "s3",
                "tool": "text_template",
                "depends_on": ["s2"],
                "arguments": {"template": "{{ v }}", "values": {"v": "answer=${s2.output.value}"}},
            },
        ]
    }
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["json_extract", "text_template"])
        task = _finished(api, api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"])
    assert task["status"] == "succeeded", task
    assert task["result"]["s2"]["value"] == 42
    assert task["result"]["s3"] == {"text": "answer=42"}


@pytest.mark.parametrize(
    ("plan", "needle"),
    [
        ([{"id": "s1", "tool": "nope"}], "unknown tool"),
        ([{"id": "s1", "tool": "parse_email", "arguments": {"raw": "x"}}], "not bound"),
        ([{"id": "s1", "tool": "json_extract", "depends_on": ["s9"]}], "s9"),
        (
            [
                {"id": "s1", "tool": "json_extract", "depends_on": ["s2"]},
                {"id": "s2", "tool": "json_extract", "depends_on": ["s1"]},
            ],
            "cycle",
        ),
        ([{"id": "s1", "tool": "json_extract"}, {"id": "s1", "tool": "json_extract"}], "s1"),
        (
            [
                {"id": "s1", "tool": "json_extract", "arguments": {"data": "${s2.output}"}},
                {"id": "s2", "tool": "json_extract"},
            ],
            "s2",
        ),
        ([], "plan"),
        ("not a list", "plan"),
    ],
)
def test_bad_plans_are_rejected_at_submit(stack: Stack, tenant: str, plan: Any, needle: str) -> None:
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["json_extract"])
        answer = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": {"plan": plan}})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "INVALID_ARGUMENT"
        assert needle in answer.json()["error"]["message"]


def test_submit_errors(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["json_extract"])
        assert api.post("/v1/agents/agt_missing/tasks", json={"input": {"plan": []}}).status_code == 404
        assert api.post(f"/v1/agents/{agent_id}/tasks", json={}).status_code == 400
        assert api.post(f"/v1/agents/{agent_id}/tasks", json={"input": {"plan": []}, "x": 1}).status_code == 400
        natural = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": "summarise my inbox"})
        assert natural.status_code == 400 and "plan" in natural.json()["error"]["message"]
        assert api.get("/v1/tasks/tsk_missing").status_code == 404


def test_idempotency_key_gives_the_same_task(stack: Stack, tenant: str) -> None:
    plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": 1}, "path": "a"}}]}
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["json_extract"])
        first = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan, "idempotency_key": "k-1"})
        second = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan, "idempotency_key": "k-1"})
        by_header = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}, headers={"Idempotency-Key": "k-1"})
        other = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan, "idempotency_key": "k-2"})
        assert first.status_code == second.status_code == 202
        assert first.json()["task_id"] == second.json()["task_id"] == by_header.json()["task_id"]
        assert other.json()["task_id"] != first.json()["task_id"]


def test_events_stream_in_order_and_resume(stack: Stack, tenant: str) -> None:
    plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": 1}, "path": "a"}}]}
    with stack.client(tenant, "member") as member, stack.client(tenant) as admin:
        agent_id = _agent(admin, ["json_extract"])
        task_id = member.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        events = _events(member, task_id)
        types = [e["type"] for e in events]
        assert types == ["task.queued", "task.started", "tool.started", "tool.finished", "task.succeeded"]
        assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
        assert events[3]["step_id"] == "s1" and events[3]["status"] == "succeeded"
        resumed = _events(member, task_id, **{"Last-Event-ID": "3"})
        assert [e["seq"] for e in resumed] == [4, 5]


def test_failed_step_fails_the_task_and_skips_dependents(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    plan = {
        "plan": [
            {"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/status/500"}},
            {"id": "s2", "tool": "json_extract", "depends_on": ["s1"], "arguments": {"data": {}, "path": "a"}},
        ]
    }
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["http_request", "json_extract"])
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        events = _events(api, task_id)
        task = api.get(f"/v1/tasks/{task_id}").json()
    assert task["status"] == "failed" and "s1" in task["error"] and "500" in task["error"]
    assert {s["id"]: s["status"] for s in task["steps"]} == {"s1": "failed", "s2": "skipped"}
    assert events[-1]["type"] == "task.failed"


def test_cancel_a_running_task(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    plan = {"plan": [{"id": "slow", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/sleep/5"}}]}
    with stack.client(tenant, "member") as member, stack.client(tenant) as admin:
        agent_id = _agent(admin, ["http_request"])
        task_id = member.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        with member.stream("GET", f"/v1/tasks/{task_id}/events") as stream:
            for line in stream.iter_lines():  # wait until the step really runs
                if line.startswith("data:") and json.loads(line[5:])["type"] == "tool.started":
                    break
        started = time.monotonic()
        cancelled = member.post(f"/v1/tasks/{task_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert time.monotonic() - started < 3
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["steps"][0]["status"] == "cancelled"
        assert _events(member, task_id)[-1]["type"] == "task.cancelled"
        again = member.post(f"/v1/tasks/{task_id}/cancel")
        assert again.status_code == 400 and again.json()["error"]["code"] == "FAILED_PRECONDITION"


def test_audit_trail_of_a_task(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    plan = {"plan": [{"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/audited"}}]}
    with stack.client(tenant, sub="auditor") as api:
        agent_id = _agent(api, ["http_request"])
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        _finished(api, task_id)
        events = api.get("/v1/audit", params={"task_id": task_id}).json()["events"]
        assert len(events) == 1
        event = events[0]
        assert event["action"] == "tool.invoke" and event["tool_id"] == "http_request"
        assert event["tenant_id"] == tenant and event["user"] == "auditor" and event["task_id"] == task_id
        assert event["target"] == f"127.0.0.1:{third_party.port}" and event["outcome"] == "ok"
        assert isinstance(event["latency_ms"], int) and event["time"]
        assert api.get("/v1/audit", params={"limit": 0}).status_code == 400
        assert len(api.get("/v1/audit", params={"limit": 1}).json()["events"]) == 1
