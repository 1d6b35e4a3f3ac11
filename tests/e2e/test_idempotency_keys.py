"""Every outbound call of a task step carries ``Idempotency-Key: <task_id>:<step_id>``, the same on every retry and
fallback, so that a third party honouring it (tests/e2e/fake_third_party.py ``/idempotent/``) performs it once."""

from __future__ import annotations

import httpx

from tests.e2e.fake_llms import Llms
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack
from tests.e2e.test_tasks import _finished
from tests.fakes.llm import Call, Reply


def _agent(api: httpx.Client, tools: list[str], **fields: object) -> str:
    answer = api.post("/v1/agents", json={"name": "payer", "tools": tools, **fields})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _keys(third_party: FakeThirdParty, path: str) -> list[str | None]:
    return [r.headers.get("Idempotency-Key") for r in third_party.requests_to(path)]


def test_a_plan_step_sends_its_key_on_every_retry_and_the_side_effect_happens_once(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    charge, refund = f"/idempotent/charge-{tenant}", f"/idempotent/refund-{tenant}"
    plan = {
        "plan": [
            # The first answer is lost (503 after the charge was made): the integrator retries, with the same key.
            {"id": "charge", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}{charge}?lose=1"}},
            # A key written into the arguments is replaced by the step's: a retried step must stay one operation.
            {
                "id": "refund",
                "tool": "http_request",
                "arguments": {"url": f"{third_party.base_url}{refund}", "headers": {"idempotency-key": "mine"}},
            },
        ]
    }
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["http_request"])
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        task = _finished(api, task_id)
    assert task["status"] == "succeeded", task
    assert _keys(third_party, charge) == [f"{task_id}:charge", f"{task_id}:charge"]
    assert third_party.performed[f"{task_id}:charge"] == 1
    assert task["result"]["charge"] == {"key": f"{task_id}:charge", "performed": 1, "requests": 2}
    assert _keys(third_party, refund) == [f"{task_id}:refund"]


def test_a_custom_tool_and_its_fallback_send_the_steps_key(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    primary, backup = f"/status/500/{tenant}", f"/idempotent/backup-{tenant}"
    with stack.client(tenant) as api:
        for tool_id, path, fallback in (("backup", backup, None), ("primary", primary, "backup")):
            body = {
                "tool_id": f"{tool_id}",
                "name": tool_id,
                "endpoint": f"{third_party.base_url}{path}",
                "method": "POST",
                "auth": "none",
                "parameters": [],
            }
            if fallback:
                body["fallback_tool_id"] = fallback
            assert api.post("/v1/tools", json=body).status_code == 201
        agent_id = _agent(api, ["primary", "backup"])
        plan = {"plan": [{"id": "pay", "tool": "primary"}]}
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        task = _finished(api, task_id)
        # A direct invoke belongs to no task: it sends no key of ours (the caller may send its own in http_request).
        direct = api.post("/v1/tools/backup/invoke", json={"arguments": {}})
    assert task["status"] == "succeeded", task
    assert _keys(third_party, primary)[0] == f"{task_id}:pay"
    assert _keys(third_party, backup) == [f"{task_id}:pay", None]
    assert direct.status_code == 200 and direct.json()["output"]["key"] == ""


def test_each_tool_call_of_the_llm_loop_has_its_own_stable_key(
    stack: Stack, tenant: str, llms: Llms, third_party: FakeThirdParty
) -> None:
    path = f"/idempotent/loop-{tenant}"
    url = f"{third_party.base_url}{path}"
    model = llms.model(
        # The model repeats its call id: the keys are the platform's step ids, never the model's.
        Reply(calls=(Call("http_request", {"url": url}, id="same"), Call("http_request", {"url": url}, id="same"))),
        Reply(calls=(Call("http_request", {"url": url}),)),
        Reply(text="done"),
    )
    with stack.client(tenant) as api:
        agent_id = _agent(api, ["http_request"], llm=llms.config(model))
        submitted = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": "pay three times"})
        task = _finished(api, submitted.json()["task_id"])
    task_id = task["task_id"]
    assert task["status"] == "succeeded", task
    assert sorted(_keys(third_party, path)) == [f"{task_id}:t1c1", f"{task_id}:t1c2", f"{task_id}:t2c1"]
    assert [s["id"] for s in task["steps"]] == ["t1c1", "t1c2", "t2c1"]
