"""Human approval: a tool with ``requires_approval`` pauses the task before each call (``waiting_approval``, an
``approval.requested`` event with a ``call_id``) until an admin approves or rejects it, on REST or public gRPC."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx

from altan.v1 import agent_pb2, agent_pb2_grpc
from tests.e2e.fake_llms import Llms
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack, new_tenant
from tests.e2e.test_tasks import _events, _finished
from tests.fakes.llm import Call, Reply


def _pay_tool(api: httpx.Client, third_party: FakeThirdParty, path: str) -> None:
    tool = {
        "tool_id": "pay",
        "name": "Pay",
        "description": "Pays an invoice.",
        "endpoint": f"{third_party.base_url}{path}",
        "method": "POST",
        "auth": "none",
        "parameters": [{"name": "invoice", "type": "string", "required": True}],
        "requires_approval": True,
    }
    created = api.post("/v1/tools", json=tool)
    assert created.status_code == 201, created.text
    assert created.json()["requires_approval"] is True


def _agent(api: httpx.Client, **fields: Any) -> str:
    answer = api.post("/v1/agents", json={"name": "payer", "tools": ["pay"], **fields})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _until_asked(api: httpx.Client, task_id: str) -> dict[str, Any]:
    """Follows the task's events until its approval.requested event, which it returns."""
    with api.stream("GET", f"/v1/tasks/{task_id}/events", timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                event: dict[str, Any] = json.loads(line[5:])
                assert event["type"] not in ("task.succeeded", "task.failed"), event
                if event["type"] == "approval.requested":
                    return event
    raise AssertionError("the stream ended without an approval.requested event")


def test_a_plan_step_waits_for_an_admins_approval_then_runs_once(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    path = f"/idempotent/pay-{tenant}"
    with stack.client(tenant) as admin, stack.client(tenant, "member") as member:
        _pay_tool(admin, third_party, path)
        agent_id = _agent(admin)
        plan = {"plan": [{"id": "s1", "tool": "pay", "arguments": {"invoice": "INV-7"}}]}
        task_id = member.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        asked = _until_asked(member, task_id)
        assert (asked["call_id"], asked["step_id"], asked["tool"]) == ("s1", "s1", "pay")
        assert asked["arguments"] == {"invoice": "INV-7"}
        waiting = member.get(f"/v1/tasks/{task_id}").json()
        assert waiting["status"] == "waiting_approval" and waiting["steps"][0]["status"] == "waiting_approval"
        assert third_party.requests_to(path) == []  # nothing is called before the decision

        route = f"/v1/tasks/{task_id}/approvals/s1"
        assert member.post(route, json={"approve": True}).status_code == 403
        with stack.client(new_tenant()) as stranger:
            assert stranger.post(route, json={"approve": True}).status_code == 404
        assert admin.post(f"/v1/tasks/{task_id}/approvals/s9", json={"approve": True}).status_code == 404
        for bad in ({"approve": "yes"}, {}, {"approve": True, "extra": 1}, {"approve": True, "comment": "x" * 2001}):
            assert admin.post(route, json=bad).status_code == 400, bad
        approved = admin.post(route, json={"approve": True, "comment": "invoice checked"})
        assert approved.status_code == 200, approved.text
        again = admin.post(route, json={"approve": False})
        assert again.status_code == 409 and "already approved" in again.json()["error"]["message"]

        task = _finished(member, task_id)
        events = _events(member, task_id)
        audit = admin.get("/v1/audit", params={"task_id": task_id}).json()["events"]
    assert task["status"] == "succeeded", task
    (decision,) = [e for e in audit if e["action"] == "approval.decide"]
    assert (decision["user"], decision["outcome"], decision["tool_id"]) == ("alice", "ok", "pay")
    assert decision["reason"] == "call 's1' approved: invoice checked"
    assert [e["action"] for e in audit] == ["approval.decide", "tool.invoke"]
    assert third_party.performed[f"{task_id}:s1"] == 1
    (decided,) = [e for e in events if e["type"] == "approval.decided"]
    assert (decided["approved"], decided["decided_by"], decided["comment"]) == (True, "alice", "invoice checked")
    types = [e["type"] for e in events]
    assert types.index("approval.requested") < types.index("approval.decided") < types.index("tool.finished")


def test_a_rejected_plan_step_fails_the_task_and_is_never_called(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    path = f"/idempotent/refused-{tenant}"
    with stack.client(tenant) as admin:
        _pay_tool(admin, third_party, path)
        agent_id = _agent(admin)
        plan = {"plan": [{"id": "s1", "tool": "pay", "arguments": {"invoice": "INV-8"}}]}
        task_id = admin.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        _until_asked(admin, task_id)
        # Public gRPC, as REST: the same decision, the same answer.
        with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            metadata = (("authorization", f"Bearer {stack.token(tenant)}"),)
            request = agent_pb2.DecideApprovalRequest(task_id=task_id, call_id="s1", approve=False, comment="duplicate")
            answer = stub.DecideApproval(request, metadata=metadata, timeout=10)
            assert answer.task.task_id == task_id
            member = (("authorization", f"Bearer {stack.token(tenant, 'member')}"),)
            try:
                stub.DecideApproval(request, metadata=member, timeout=10)
                raise AssertionError("a member decided")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
        task = _finished(admin, task_id)
        audit = admin.get("/v1/audit", params={"task_id": task_id}).json()["events"]
    assert task["status"] == "failed" and "rejected by alice: duplicate" in task["error"], task
    assert [(e["action"], e["outcome"], e["reason"]) for e in audit] == [
        ("approval.decide", "denied", "call 's1' rejected: duplicate")
    ]
    assert third_party.requests_to(path) == []


def test_the_llm_reads_a_rejection_as_the_calls_result(
    stack: Stack, tenant: str, third_party: FakeThirdParty, llms: Llms
) -> None:
    path = f"/idempotent/llm-refused-{tenant}"
    model = llms.model(Reply(calls=(Call("pay", {"invoice": "INV-9"}),)), Reply(text="I did not pay."))
    with stack.client(tenant) as admin:
        _pay_tool(admin, third_party, path)
        agent_id = _agent(admin, llm=llms.config(model))
        task_id = admin.post(f"/v1/agents/{agent_id}/tasks", json={"input": "Pay INV-9"}).json()["task_id"]
        asked = _until_asked(admin, task_id)
        assert asked["call_id"] == "t1c1"
        decided = admin.post(f"/v1/tasks/{task_id}/approvals/t1c1", json={"approve": False, "comment": "not today"})
        assert decided.status_code == 200, decided.text
        task = _finished(admin, task_id)
    assert task["status"] == "succeeded" and task["result"] == {"answer": "I did not pay."}, task
    tool_message = llms.requests(model)[1].body["messages"][-1]
    assert tool_message["role"] == "tool" and "rejected by alice: not today" in tool_message["content"]
    assert third_party.requests_to(path) == []
