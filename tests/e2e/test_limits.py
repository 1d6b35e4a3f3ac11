"""Size limits (ALTAN_MAX_OUTPUT_BYTES, ALTAN_MAX_EXPANSION_BYTES, ALTAN_MAX_TASK_BYTES): over them a call or a step
fails with a clear error, and the task stays readable. The e2e stack sets them to 256 KiB, 128 KiB and 1 MiB."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack

OUTPUT_LIMIT, EXPANSION_LIMIT, TASK_LIMIT = 256 * 1024, 128 * 1024, 1024 * 1024


def _agent(api: httpx.Client, tools: list[str]) -> str:
    answer = api.post("/v1/agents", json={"name": "limits", "tools": tools})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _finished(api: httpx.Client, agent_id: str, plan: list[dict[str, Any]]) -> dict[str, Any]:
    submitted = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": {"plan": plan}})
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]
    with api.stream("GET", f"/v1/tasks/{task_id}/events") as events:
        for line in events.iter_lines():
            if line.startswith("event: task.") and line.split(".", 1)[1] in ("succeeded", "failed", "cancelled"):
                break
    task = api.get(f"/v1/tasks/{task_id}")
    assert task.status_code == 200, task.text  # however it ended, the task can be read
    return dict(task.json())


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_tool_output_over_the_limit_is_a_clear_400(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    with stack.client(tenant) as api:
        fits = api.post(
            "/v1/tools/http_request/invoke", json={"arguments": {"url": f"{third_party.base_url}/big/200000"}}
        )
        assert fits.status_code == 200 and len(fits.json()["output"]["data"]) == 200_000
        too_big = api.post(
            "/v1/tools/http_request/invoke", json={"arguments": {"url": f"{third_party.base_url}/big/300000"}}
        )
        assert too_big.status_code == 400
        assert too_big.json()["error"]["message"] == (
            f"response from 127.0.0.1:{third_party.port} is larger than {OUTPUT_LIMIT} bytes"
        )
        # A built-in's output is held to the same limit.
        template = api.post(
            "/v1/tools/text_template/invoke",
            json={"arguments": {"template": "{{ v }}" * 6, "values": {"v": "x" * 50_000}}},
        )
        assert template.status_code == 400
        assert template.json()["error"]["message"] == (
            f"the output of tool 'text_template' is 300011 bytes, over the limit of {OUTPUT_LIMIT} "
            "(ALTAN_MAX_OUTPUT_BYTES)"
        )


def test_references_that_expand_too_far_fail_their_step_not_the_agent(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    """One output referenced over and over used to be copied each time (the agent grew by 780 MB)."""
    agent_pid = stack.service_pids()["agent"]
    before = _rss_bytes(agent_pid)
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["http_request", "json_extract"])
        copies = {f"c{i}": "${s1.output}" for i in range(200)}
        task = _finished(
            api,
            agent_id,
            [
                {"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/big/100000"}},
                {"id": "s2", "tool": "json_extract", "depends_on": ["s1"], "arguments": {"data": copies, "path": "c0"}},
            ],
        )
    assert task["status"] == "failed"
    steps = {s["id"]: s for s in task["steps"]}
    assert steps["s1"]["status"] == "succeeded" and len(steps["s1"]["output"]["data"]) == 100_000
    assert steps["s2"]["status"] == "failed"
    assert steps["s2"]["error"] == (
        f"step s2: the references in its arguments expand to more than {EXPANSION_LIMIT} bytes "
        "(ALTAN_MAX_EXPANSION_BYTES)"
    )
    assert task["error"] == f"step s2 failed: {steps['s2']['error']}"
    assert _rss_bytes(agent_pid) - before < 64 * 1024 * 1024


def test_a_task_stops_growing_at_its_limit_and_stays_readable(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["http_request"])
        # Eight outputs of ~100 KB, each held twice (step and result): 1.6 MB, over the 1 MiB limit.
        plan = [
            {"id": f"s{i}", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/big/100000"}}
            for i in range(8)
        ]
        task = _finished(api, agent_id, plan)
        raw = api.get(f"/v1/tasks/{task['task_id']}").content
    assert task["status"] == "failed"
    failed = [s for s in task["steps"] if s["status"] == "failed"]
    assert failed and all(s["error"].endswith(f"past {TASK_LIMIT} bytes (ALTAN_MAX_TASK_BYTES)") for s in failed)
    assert sum(s["status"] == "succeeded" for s in task["steps"]) >= 4
    assert len(raw) < TASK_LIMIT + 64 * 1024
    assert json.loads(raw)["result"] is None
