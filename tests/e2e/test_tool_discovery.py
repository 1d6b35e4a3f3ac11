"""Tool containers found through the Kubernetes API, end to end: the stack's Tool Service runs with
ALTAN_TOOL_DISCOVERY=kubernetes against a fake API server (tests/fakes/kubernetes.py, reached through a kubeconfig
with a bearer token), the containers are real `altan serve-tools` processes, and a tool appears when its Service is
ADDED and is gone when it is DELETED."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack, free_port, new_tenant, start_stack
from tests.e2e.test_tool_containers import ROOT, Container, serve_tools, wait_until
from tests.fakes.kubernetes import FakeKubernetes, kubeconfig, start_fake_kubernetes

NAMESPACE = "acme"


@pytest.fixture(scope="module")
def api_server() -> Iterator[FakeKubernetes]:
    fake = start_fake_kubernetes()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def weather() -> Iterator[Container]:
    container = serve_tools(ROOT / "examples" / "weather.py", free_port())
    yield container
    assert container.stop() == 0


@pytest.fixture(scope="module")
def stack(api_server: FakeKubernetes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = tmp_path_factory.mktemp("kube") / "config"
    config.write_text(kubeconfig(api_server, NAMESPACE))
    env = {
        "ALTAN_TOOL_DISCOVERY": "kubernetes",
        "ALTAN_TOOL_DISCOVERY_NAMESPACE": NAMESPACE,
        # `<service>.<namespace>.svc` does not resolve outside a cluster: the fake's Services have 127.0.0.1 as their
        # cluster IP instead.
        "ALTAN_TOOL_DISCOVERY_ADDRESS": "cluster-ip",
        "KUBECONFIG": str(config),
    }
    running = start_stack(
        data_dir=tmp_path_factory.mktemp("data-discovery"), egress_allow="", redis_url=None, extra_env=env
    )
    yield running
    assert running.stop() == 0, running.logs()[-5000:]


def _tool_ids(stack: Stack, tenant: str) -> set[str]:
    with stack.client(tenant, role="member") as api:
        answer = api.get("/v1/tools")
        assert answer.status_code == 200, answer.text
        return {t["tool_id"] for t in answer.json()["tools"] if t["type"] == "container"}


def test_a_tool_comes_with_its_service_and_goes_with_it(
    stack: Stack, api_server: FakeKubernetes, weather: Container
) -> None:
    tenant = new_tenant()
    assert _tool_ids(stack, tenant) == set()
    lists = [r for r in api_server.requests if r.query.get("watch") != "true"]
    assert lists and lists[0].path == f"/api/v1/namespaces/{NAMESPACE}/services"
    assert lists[0].query["labelSelector"] == "altan.io/tool-container=true"

    api_server.put(NAMESPACE, "altan-tool-weather", [{"name": "grpc", "port": weather.port, "protocol": "TCP"}])
    wait_until(lambda: _tool_ids(stack, tenant) == {"forecast"})
    with stack.client(tenant, role="member") as api:
        answer = api.post("/v1/tools/forecast/invoke", json={"arguments": {"city": "Paris", "days": 3}})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"output": {"city": "Paris", "days": 3}}
        assert api.get("/v1/audit").json()["events"][0]["target"] == weather.address

    api_server.delete(NAMESPACE, "altan-tool-weather")
    wait_until(lambda: _tool_ids(stack, tenant) == set())
    with stack.client(tenant, role="member") as api:
        assert api.post("/v1/tools/forecast/invoke", json={"arguments": {"city": "Paris"}}).status_code == 404


def test_the_discovery_log_names_what_came_and_went(stack: Stack) -> None:
    logs = stack.logs()
    assert "tool containers discovered" in logs, logs[-3000:]


def test_kubeconfig_is_the_only_way_in(tmp_path: Path) -> None:
    """Without the in-cluster files or a kubeconfig, discovery refuses to start: it never guesses an API server."""
    env = {
        "ALTAN_TOOL_DISCOVERY": "kubernetes",
        "ALTAN_TOOL_DISCOVERY_NAMESPACE": NAMESPACE,
        "KUBECONFIG": str(tmp_path / "missing"),
    }
    running = start_stack(data_dir=tmp_path, egress_allow="", redis_url=None, extra_env=env, wait_ready=False)
    running.process.wait(timeout=60)  # the Tool Service refuses to start, and so `altan up` stops
    code = running.stop()  # (closes its output)
    assert code != 0 and "ALTAN_TOOL_DISCOVERY=kubernetes" in running.logs(), running.logs()[-3000:]
