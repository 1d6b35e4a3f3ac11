"""Rate limits: a custom tool's ``rate_limit`` holds per tenant (API.md "Custom tool"): a direct invoke over it is 429
with ``Retry-After`` and never reaches the third party; a task's steps wait for capacity instead of failing. And the
operator's limit on each tenant's requests at the gateway."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from altan.v1 import tool_pb2, tool_pb2_grpc
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack, start_stack


def test_over_the_limit_a_direct_call_is_429_and_a_task_step_waits(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    path = f"/limited-{tenant}"
    tool = {
        "tool_id": "limited",
        "name": "Limited",
        "endpoint": f"{third_party.base_url}{path}",
        "method": "GET",
        "rate_limit": {"requests": 1, "per_seconds": 1},
    }
    with stack.client(tenant) as api, stack.client(f"{tenant}-other") as other:
        for client in (api, other):
            assert client.post("/v1/tools", json=tool).status_code == 201
        assert api.post("/v1/tools/limited/invoke", json={"arguments": {}}).status_code == 200
        refused = api.post("/v1/tools/limited/invoke", json={"arguments": {}})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert 0 < float(refused.headers["Retry-After"]) <= 1
        assert other.post("/v1/tools/limited/invoke", json={"arguments": {}}).status_code == 200  # per tenant
        agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["limited"]}).json()["id"]
        plan = {"plan": [{"id": f"s{i}", "tool": "limited", "arguments": {}} for i in range(3)]}
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        with api.stream("GET", f"/v1/tasks/{task_id}/events") as events:
            assert "task.succeeded" in "".join(events.iter_text())
    calls = third_party.requests_to(path)
    assert len(calls) == 2 + 3  # the refused call never went out
    # Three independent steps would run at once; at one call a second they spread over about two seconds.
    task_calls = [c.at for c in calls[-3:]]
    assert max(task_calls) - min(task_calls) >= 1.5


def test_a_tenants_request_rate_at_the_gateway_holds_across_rest_and_grpc(
    tmp_path: Path, redis_url: str, tenant: str
) -> None:
    """ALTAN_TENANT_REQUESTS_PER_SECOND: one bucket per tenant in Redis for both public ports; of twenty requests
    sent at once with a burst of eight, exactly eight pass."""
    env = {"ALTAN_TENANT_REQUESTS_PER_SECOND": "0.001", "ALTAN_TENANT_BURST": "8"}  # no refill within the test
    stack = start_stack(data_dir=tmp_path, egress_allow="", redis_url=redis_url, extra_env=env)
    try:
        with stack.client(tenant) as api, ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda _: api.get("/v1/tools").status_code, range(20)))
            assert sorted(statuses) == [200] * 8 + [429] * 12
            refused = api.get("/v1/agents")
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
            assert int(refused.headers["Retry-After"]) > 900
            metadata = (("authorization", f"Bearer {stack.token(tenant)}"),)
            with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
                with pytest.raises(grpc.RpcError) as caught:
                    tool_pb2_grpc.ToolServiceStub(channel).ListTools(
                        tool_pb2.ListToolsRequest(), metadata=metadata, timeout=10
                    )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with stack.client(f"{tenant}-other") as other:
                assert other.get("/v1/tools").status_code == 200  # a bucket per tenant
            assert httpx.get(f"{stack.base_url}/healthz").status_code == 200  # probes are not the tenant's
    finally:
        stack.stop()


def test_a_host_that_asks_to_wait_is_not_called_again_before_then(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    """A third party that keeps answering 503 with ``Retry-After: 60`` is left alone by that tenant for a minute."""
    busy = f"{third_party.base_url}/flaky/{tenant}/1000/60"
    with stack.client(tenant) as api, stack.client(f"{tenant}-other") as other:
        first = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": busy}})
        assert first.status_code == 200 and first.json()["status"] == 503  # its answer, after the call's retries
        calls = len(third_party.requests_to(f"/flaky/{tenant}/1000/60"))
        again = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": f"{third_party.base_url}/x"}})
        assert again.status_code == 429 and "asked to wait" in again.json()["error"]["message"]
        assert 55 <= int(again.headers["Retry-After"]) <= 60
        assert len(third_party.requests_to(f"/flaky/{tenant}/1000/60")) == calls
        assert other.post("/v1/tools/http_request/invoke", json={"arguments": {"url": busy}}).status_code == 200
