"""A custom tool with ``cacheable_seconds`` answers identical arguments from the tenant's cache (API.md "Custom
tool"): the answer says ``"cached": true`` and the third party is not called again; never across tenants, never for
a call that failed, and a plan step is served the same way."""

from __future__ import annotations

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack


def test_identical_calls_are_answered_from_the_tenants_cache(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    path = f"/cached-{tenant}"
    tool = {
        "tool_id": "lookup",
        "name": "Lookup",
        "endpoint": f"{third_party.base_url}{path}",
        "method": "GET",
        "parameters": [{"name": "q", "type": "string", "required": True}],
        "cacheable_seconds": 300,
    }
    failing = tool | {"tool_id": "broken", "endpoint": f"{third_party.base_url}/status/404"}
    with stack.client(tenant) as api, stack.client(f"{tenant}-other") as other:
        for client in (api, other):
            assert client.post("/v1/tools", json=tool).status_code == 201
        api.post("/v1/tools", json=failing)
        failures_before = len(third_party.requests_to("/status/404"))
        first = api.post("/v1/tools/lookup/invoke", json={"arguments": {"q": "ada"}}).json()
        again = api.post("/v1/tools/lookup/invoke", json={"arguments": {"q": "ada"}}).json()
        assert "cached" not in first and again == first | {"cached": True}
        assert api.post("/v1/tools/lookup/invoke", json={"arguments": {"q": "bob"}}).json().get("cached") is None
        assert "cached" not in other.post("/v1/tools/lookup/invoke", json={"arguments": {"q": "ada"}}).json()
        for _ in range(2):
            answer = api.post("/v1/tools/broken/invoke", json={"arguments": {"q": "ada"}}).json()
            assert answer["status"] == 404 and "cached" not in answer
        agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["lookup"]}).json()["id"]
        plan = {"plan": [{"id": "s1", "tool": "lookup", "arguments": {"q": "ada"}}]}
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        with api.stream("GET", f"/v1/tasks/{task_id}/events") as events:
            assert "task.succeeded" in "".join(events.iter_text())
        step = api.get(f"/v1/tasks/{task_id}").json()["steps"][0]
        audit = api.get("/v1/audit", params={"limit": 100}).json()["events"]
    assert step["output"] == first["output"]
    # ada (tenant), bob (tenant), ada (other tenant): the repeat and the plan step never reached the third party.
    assert [r.query["q"] for r in third_party.requests_to(path)] == [["ada"], ["bob"], ["ada"]]
    assert len(third_party.requests_to("/status/404")) == failures_before + 2
    assert [e["reason"] for e in audit if e["tool_id"] == "lookup"].count("answered from the cache") == 2
