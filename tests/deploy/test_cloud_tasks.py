"""The Cloud Tasks work queue in the chart (agent.workQueue): the agent's Settings select it, its push port is on a
Service with a virtual IP, an optional Ingress exposes POST /v1/work of it and nothing else, only the named peers
(Google's load balancers) reach that port, and values that cannot work stop the install."""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlsplit

import helm_python
import pytest

from .environment import service_settings
from .manifests import SCENARIOS, Render, pod_spec, scenario_values

NAMESPACE = "tenant-ct"


def _cloud_tasks(rendered: Render) -> dict[str, Any] | None:
    queue = rendered.values["agent"]["workQueue"]
    return queue["cloudTasks"] if queue["type"] == "cloud-tasks" else None


def test_the_agent_is_configured_for_the_queue_it_is_given(rendered: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    ct = _cloud_tasks(rendered)
    _, settings = service_settings(rendered, "agent", monkeypatch)
    if ct is None:
        assert settings.work_queue == "" and settings.agent_push_port is None
        return
    assert settings.work_queue == "cloud-tasks"
    assert (settings.cloud_tasks_queue, settings.cloud_tasks_push_url) == (ct["queue"], ct["pushUrl"])
    assert settings.cloud_tasks_service_account == ct["serviceAccount"]
    assert settings.cloud_tasks_audience == (ct["audience"] or None)
    assert settings.cloud_tasks_dispatch_deadline_seconds == ct["dispatchDeadlineSeconds"]
    assert settings.agent_push_port == ct["pushPort"]
    assert settings.cloud_tasks_jwks_url == "https://www.googleapis.com/oauth2/v3/certs"
    assert settings.gcp_emulator_host is None, "the chart never points at an emulator"
    for component in ("gateway", "tool", "integrator"):
        assert service_settings(rendered, component, monkeypatch)[1].work_queue == ""


def test_the_push_port_has_a_service_and_only_the_push_path_an_ingress(rendered: Render) -> None:
    ct = _cloud_tasks(rendered)
    services = [s for s in rendered.of_kind("Service") if s["metadata"]["name"].endswith("-agent-push")]
    ingresses = rendered.of_kind("Ingress")
    if ct is None:
        assert services == [] and ingresses == []
        return
    (service,) = services
    assert service["spec"]["type"] == "ClusterIP" and service["spec"].get("clusterIP") != "None"
    push = {"name": "push", "port": ct["pushPort"], "targetPort": "push", "protocol": "TCP"}
    assert service["spec"]["ports"] == [push]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "agent"
    assert service["metadata"]["annotations"]["cloud.google.com/neg"] == '{"ingress": true}'
    (agent,) = pod_spec(rendered.workload("agent"))["containers"]
    assert {"name": "push", "containerPort": ct["pushPort"], "protocol": "TCP"} in agent["ports"]
    if not ct["ingress"]["enabled"]:
        assert ingresses == []
        return
    (ingress,) = ingresses
    assert ingress["metadata"].get("annotations", {}) == ct["ingress"]["annotations"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == urlsplit(ct["pushUrl"]).hostname
    backend = {"service": {"name": service["metadata"]["name"], "port": {"name": "push"}}}
    assert rule["http"]["paths"] == [{"path": "/v1/work", "pathType": "Exact", "backend": backend}]
    assert "defaultBackend" not in ingress["spec"]


def test_only_the_named_peers_reach_the_push_port(rendered: Render) -> None:
    ct = _cloud_tasks(rendered)
    (policy,) = [p for p in rendered.of_kind("NetworkPolicy") if p["metadata"]["name"].endswith("-agent")]
    rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == (ct or {}).get("pushPort") for p in r["ports"])]
    if ct is None:
        assert rules == []
        return
    (rule,) = rules
    assert rule["from"] == ct["pushFrom"] and rule["from"], "never open to every address"


def test_workload_identity_annotates_the_agents_service_account(rendered: Render) -> None:
    wanted = rendered.values["agent"]["serviceAccount"]["gcpServiceAccount"]
    account = rendered.get("ServiceAccount", pod_spec(rendered.workload("agent"))["serviceAccountName"])
    assert account is not None
    assert (account["metadata"].get("annotations") or {}).get("iam.gke.io/gcp-service-account", "") == wanted
    if _cloud_tasks(rendered) is not None:
        assert wanted, "the agent creates the tasks as its Google service account"


def test_some_scenarios_use_cloud_tasks_behind_an_ingress_and_some_do_not() -> None:
    queues = [scenario_values(s).get("agent", {}).get("workQueue", {}) for s in SCENARIOS]
    assert any(q.get("type") == "cloud-tasks" and q["cloudTasks"]["ingress"]["enabled"] for q in queues)
    assert any(q.get("type", "") == "" for q in queues)


CLOUD_TASKS = {
    "type": "cloud-tasks",
    "cloudTasks": {
        "queue": "projects/acme-prod/locations/europe-west1/queues/altan",
        "pushUrl": "https://tasks.example.com/v1/work",
        "serviceAccount": "push@acme-prod.iam.gserviceaccount.com",
    },
}


def _values(**agent: Any) -> dict[str, Any]:
    values = copy.deepcopy(scenario_values("external-redis"))
    values.setdefault("agent", {}).update(agent)
    return values


def test_the_external_redis_scenario_renders_with_cloud_tasks(chart: helm_python.Chart) -> None:
    account = {"gcpServiceAccount": "agent@acme-prod.iam.gserviceaccount.com"}
    files = chart.render(_values(workQueue=CLOUD_TASKS, serviceAccount=account), name="altan", namespace=NAMESPACE)
    assert any(path.endswith("agent-push.yaml") and "kind: Service" in text for path, text in files.items())


@pytest.mark.parametrize(
    ("agent", "message"),
    [
        ({"workQueue": CLOUD_TASKS}, "needs agent.serviceAccount.gcpServiceAccount"),
        (
            {
                "workQueue": {**CLOUD_TASKS, "cloudTasks": {"queue": CLOUD_TASKS["cloudTasks"]["queue"]}},  # type: ignore[dict-item]
                "serviceAccount": {"gcpServiceAccount": "agent@acme-prod.iam.gserviceaccount.com"},
            },
            "needs agent.workQueue.cloudTasks.queue, .pushUrl and .serviceAccount",
        ),
    ],
)
def test_the_install_stops_on_cloud_tasks_values_that_cannot_work(
    chart: helm_python.Chart, agent: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        chart.render(_values(**agent), name="altan", namespace=NAMESPACE)


def test_cloud_tasks_without_redis_stops_the_install(chart: helm_python.Chart) -> None:
    values = copy.deepcopy(scenario_values("autoscaling-off"))
    account = {"gcpServiceAccount": "agent@acme-prod.iam.gserviceaccount.com"}
    values.setdefault("agent", {}).update(workQueue=CLOUD_TASKS, serviceAccount=account)
    with pytest.raises(helm_python.HelmError, match=re.escape("needs Redis (redis.url)")):
        chart.render(values, name="altan", namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("cloud_tasks", "where"),
    [
        ({"pushUrl": "http://tasks.example.com/v1/work"}, "/agent/workQueue/cloudTasks/pushUrl"),
        ({"pushUrl": "https://tasks.example.com/other"}, "/agent/workQueue/cloudTasks/pushUrl"),
        ({"queue": "projects/acme-prod/queues/altan"}, "/agent/workQueue/cloudTasks/queue"),
        ({"dispatchDeadlineSeconds": 3600}, "/agent/workQueue/cloudTasks/dispatchDeadlineSeconds"),
        ({"region": "eu"}, "/agent/workQueue/cloudTasks"),
    ],
)
def test_the_schema_refuses_what_the_agent_would(
    chart: helm_python.Chart, cloud_tasks: dict[str, Any], where: str
) -> None:
    queue = {**CLOUD_TASKS, "cloudTasks": {**CLOUD_TASKS["cloudTasks"], **cloud_tasks}}  # type: ignore[dict-item]
    with pytest.raises(helm_python.HelmError, match=re.escape(f"at '{where}")):
        chart.validate_schema(scenario_values("default") | {"agent": {"workQueue": queue}})
