"""The agent on the Cloud Tasks work queue (``ALTAN_WORK_QUEUE=cloud-tasks``), through the real processes: the agent
creates each accepted task with the real ``google-cloud-tasks`` client in the in-process fake of the API
(tests/fakes/cloud_tasks.py), which pushes it back to the agent's push port with an OIDC token it signs. Tasks run to
their end; an agent killed mid-task (SIGKILL) breaks its push, Cloud Tasks retries it and the task goes on from its
last step, the step in flight performed once; a task waiting for approval does not hold its push (it parks, and the
decision wakes it)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from services.agent.cloud_tasks import PUSH_PATH, task_id_for
from services.agent.work_queue import WorkItem
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack, free_port, new_tenant, start_stack
from tests.e2e.test_approvals import _pay_tool, _until_asked
from tests.e2e.test_durable_tasks import _terminal
from tests.e2e.test_supervision import wait_until
from tests.e2e.test_tasks import _events
from tests.fakes.cloud_tasks import QUEUE, SERVICE_ACCOUNT, FakeCloudTasks

TENANTS: list[str] = []


def _tenant() -> str:
    TENANTS.append(new_tenant())
    return TENANTS[-1]


@pytest.fixture(scope="module")
def cloud_tasks() -> Iterator[FakeCloudTasks]:
    with FakeCloudTasks(min_backoff=0.2, max_backoff=1.0) as fake:
        yield fake


@pytest.fixture(scope="module")
def ct_stack(
    redis_url: str, third_party: FakeThirdParty, cloud_tasks: FakeCloudTasks, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    push_port = free_port()
    env = {
        "ALTAN_WORK_QUEUE": "cloud-tasks",
        "ALTAN_CLOUD_TASKS_QUEUE": QUEUE,
        "ALTAN_CLOUD_TASKS_PUSH_URL": f"http://127.0.0.1:{push_port}{PUSH_PATH}",
        "ALTAN_CLOUD_TASKS_SERVICE_ACCOUNT": SERVICE_ACCOUNT,
        "ALTAN_CLOUD_TASKS_JWKS_URL": cloud_tasks.jwks_url,
        "ALTAN_AGENT_PUSH_PORT": str(push_port),
        "ALTAN_GCP_EMULATOR_HOST": cloud_tasks.address,
        "NO_GCE_CHECK": "true",
    }
    stack = start_stack(
        data_dir=tmp_path_factory.mktemp("cloud-tasks"),
        egress_allow=f"127.0.0.1:{third_party.port}",
        redis_url=redis_url,
        extra_env=env,
    )
    stack.internal_ports["push"] = push_port
    yield stack
    try:
        assert stack.stop() == 0
    finally:
        client = redis.Redis.from_url(redis_url)
        for pattern in (f"altan:{t}:*" for t in TENANTS):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
        client.close()


def _pushes(fake: FakeCloudTasks, tenant: str, task_id: str, wake: str = "") -> list[Any]:
    name = f"{QUEUE}/tasks/{task_id_for(WorkItem(tenant, task_id), wake)}"
    with fake._lock:
        return [a for a in fake.attempts if a.task == name]


def test_tasks_submitted_on_the_rest_api_are_pushed_by_cloud_tasks_and_succeed(
    ct_stack: Stack, cloud_tasks: FakeCloudTasks
) -> None:
    tenant = _tenant()
    plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": {"b": 7}}, "path": "a.b"}}]}
    with ct_stack.client(tenant) as api:
        agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["json_extract"]}).json()["id"]
        submitted = [
            api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan, "idempotency_key": f"k{i % 3}"}).json()
            for i in range(6)
        ]
        ids = sorted({t["task_id"] for t in submitted})
        tasks = [_terminal(ct_stack, api, task_id) for task_id in ids]
    assert len(ids) == 3
    assert [t["status"] for t in tasks] == ["succeeded"] * 3
    assert [t["result"] for t in tasks] == [{"s1": {"value": 7, "found": True}}] * 3
    for task_id in ids:
        name = f"{QUEUE}/tasks/{task_id_for(WorkItem(tenant, task_id))}"
        (created,) = [t for t in cloud_tasks.created if t.name == name]
        assert created.http_request.oidc_token.service_account_email == SERVICE_ACCOUNT
        # The task ended: its push was answered 2xx (once), and Cloud Tasks holds it no more.
        assert [a.status for a in _pushes(cloud_tasks, tenant, task_id)] == [200]
        assert cloud_tasks.finished[name] == "succeeded"


def test_the_push_port_runs_nothing_for_a_caller_without_googles_token(
    ct_stack: Stack, cloud_tasks: FakeCloudTasks, third_party: FakeThirdParty
) -> None:
    tenant = _tenant()
    url = f"http://127.0.0.1:{ct_stack.internal_ports['push']}{PUSH_PATH}"
    path = f"/idempotent/forged-{tenant}"
    plan = {"plan": [{"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}{path}"}}]}
    with ct_stack.client(tenant) as api:
        agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["http_request"]}).json()["id"]
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        assert _terminal(ct_stack, api, task_id)["status"] == "succeeded"
    body = WorkItem(tenant, task_id).encode()
    forged = cloud_tasks.claims("https://elsewhere.example/v1/work")
    for headers, status in (
        ({}, 401),
        ({"Authorization": f"Bearer {ct_stack.token(tenant)}"}, 401),  # a tenant's own token
        ({"Authorization": f"Bearer {cloud_tasks.sign(forged)}"}, 401),
        ({"Authorization": f"Bearer {cloud_tasks.sign(cloud_tasks.claims(url, email='x@evil.example'))}"}, 403),
    ):
        answer = httpx.post(url, content=body, headers=headers, trust_env=False, timeout=10)
        assert answer.status_code == status, answer.text
    assert third_party.performed[f"{task_id}:s1"] == 1


def test_an_agent_killed_mid_task_is_pushed_again_and_the_step_in_flight_is_performed_once(
    ct_stack: Stack, cloud_tasks: FakeCloudTasks, third_party: FakeThirdParty
) -> None:
    tenant = _tenant()
    first, second = f"/idempotent/ct-first-{tenant}", f"/idempotent/ct-second-{tenant}"
    plan = {
        "plan": [
            {"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}{first}"}},
            {
                "id": "s2",
                "tool": "http_request",
                "depends_on": ["s1"],
                "arguments": {"url": f"{third_party.base_url}{second}?sleep=3"},
            },
        ]
    }
    with ct_stack.client(tenant) as api:
        agent_id = api.post("/v1/agents", json={"name": "payer", "tools": ["http_request"]}).json()["id"]
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        wait_until(lambda: len(third_party.requests_to(second)) == 1, "step s2 reaches the third party", ct_stack)
        os.kill(ct_stack.service_pids()["agent"], signal.SIGKILL)
        task = _terminal(ct_stack, api, task_id, timeout=90)
        events = [e["type"] for e in _events(api, task_id)]
    assert task["status"] == "succeeded", task
    assert "task.resumed" in events
    pushes = _pushes(cloud_tasks, tenant, task_id)
    # The first push broke with the agent (no answer); a retry of the same task ran it to its end.
    assert pushes[0].status is None and pushes[0].error, pushes
    assert pushes[-1].status == 200 and pushes[-1].retry >= 1
    assert [r.headers["Idempotency-Key"] for r in third_party.requests_to(first)] == [f"{task_id}:s1"]
    keys = [r.headers["Idempotency-Key"] for r in third_party.requests_to(second)]
    assert len(keys) >= 2 and set(keys) == {f"{task_id}:s2"}
    assert third_party.performed[f"{task_id}:s2"] == 1
    assert task["result"]["s2"]["performed"] == 1


def test_a_task_waiting_for_approval_parks_without_holding_its_push_and_the_decision_wakes_it(
    ct_stack: Stack, cloud_tasks: FakeCloudTasks, third_party: FakeThirdParty
) -> None:
    tenant = _tenant()
    path = f"/idempotent/ct-pay-{tenant}"
    with ct_stack.client(tenant) as admin:
        _pay_tool(admin, third_party, path)
        agent_id = admin.post("/v1/agents", json={"name": "payer", "tools": ["pay"]}).json()["id"]
        plan = {"plan": [{"id": "s1", "tool": "pay", "arguments": {"invoice": "INV-9"}}]}
        task_id = admin.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        asked = _until_asked(admin, task_id)
        assert asked["call_id"] == "s1"
        # Parked: the push was answered 200 while the task still waits, and a wake-up waits at the deadline.
        wait_until(lambda: [a.status for a in _pushes(cloud_tasks, tenant, task_id)] == [200], "it parks", ct_stack)
        waiting = admin.get(f"/v1/tasks/{task_id}").json()
        assert waiting["status"] == "waiting_approval", waiting
        assert waiting["steps"][0]["status"] == "waiting_approval"
        deadline_wake = f"{QUEUE}/tasks/{task_id_for(WorkItem(tenant, task_id), 'deadline')}"
        assert deadline_wake in cloud_tasks.pending()
        (wake,) = [t for t in cloud_tasks.created if t.name == deadline_wake]
        assert wake.schedule_time.timestamp() > time.time() + 3000  # the default deadline: an hour
        assert third_party.requests_to(path) == []

        approved = admin.post(f"/v1/tasks/{task_id}/approvals/s1", json={"approve": True})
        assert approved.status_code == 200, approved.text
        task = _terminal(ct_stack, admin, task_id)
        events = [e["type"] for e in _events(admin, task_id)]
    assert task["status"] == "succeeded", task
    assert third_party.performed[f"{task_id}:s1"] == 1
    assert events.count("approval.requested") == 1 and "task.resumed" in events
    # Woken by a task of its own, created by the decision.
    decided = [t.name for t in cloud_tasks.created if t.name.startswith(deadline_wake.removesuffix("-deadline") + "-")]
    assert len(decided) == 2, decided
