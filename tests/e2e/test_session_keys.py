"""The suite removes what it writes to the shared Redis, and only that: every tenant of the session carries the
session's marker (the stack refuses to sign for any other), and the session's end deletes exactly the keys of
those tenants, then checks that none is left (tests/e2e/conftest.py, fixture ``stack``)."""

from __future__ import annotations

import pytest
import redis

from tests.e2e.stack import SESSION_MARKER, Stack, new_tenant, session_keys


@pytest.mark.parametrize("stack", ["redis"], indirect=True)
def test_the_session_finds_its_tenants_keys_and_only_those(stack: Stack, tenant: str, redis_url: str) -> None:
    derived = f"../{tenant}"  # tests also build tenants from the fixture's
    for name in (tenant, derived):
        with stack.client(name) as api:
            assert api.post("/v1/agents", json={"name": "a"}).status_code == 201
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    other_session = f"altan:t-e2e0123456789-{tenant[-12:]}:agent:agents"
    marker_not_in_tenant = f"altan:t-someone-else:agent:{SESSION_MARKER}"
    try:
        client.hset(other_session, "x", "{}")
        client.hset(marker_not_in_tenant, "x", "{}")
        mine = session_keys(client)
        assert f"altan:{tenant}:agent:agents" in mine and f"altan:{derived}:agent:agents" in mine
        assert other_session not in mine and marker_not_in_tenant not in mine
    finally:
        client.delete(other_session, marker_not_in_tenant)
        client.close()


@pytest.mark.parametrize("stack", ["redis"], indirect=True)
def test_a_tenant_without_the_marker_is_refused_before_it_writes_anything(stack: Stack) -> None:
    with pytest.raises(AssertionError, match="would leave keys in Redis"):
        stack.token("acme")
    assert SESSION_MARKER in new_tenant()
    stack.token("a:b")  # tenants the services refuse write nothing: tests may send them
