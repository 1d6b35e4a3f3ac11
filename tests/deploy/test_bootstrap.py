"""deploy/k8s: the cluster-level bootstrap of a tenant (Namespace, ResourceQuota, LimitRange), sized for the chart."""

from __future__ import annotations

import re

import yaml

from .manifests import BOOTSTRAP, SERVICES, TENANTS, RenderCache, containers, pod_spec

_UNITS = {"m": 1e-3, "": 1, "k": 1e3, "Ki": 2**10, "M": 1e6, "Mi": 2**20, "G": 1e9, "Gi": 2**30, "T": 1e12, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, value
    return float(match.group(1)) * _UNITS[match.group(2)]


def _manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(BOOTSTRAP.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_manifest() -> None:
    manifests = _manifests()
    kustomization = manifests.pop("Kustomization")
    files = sorted(p.name for p in BOOTSTRAP.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    assert set(manifests) == {"Namespace", "ResourceQuota", "LimitRange"}
    # Objects sit in the namespace the kustomization names (and renames per tenant).
    assert manifests["Namespace"]["metadata"]["name"] == kustomization["namespace"]
    for kind in ("ResourceQuota", "LimitRange"):
        assert manifests[kind]["metadata"]["namespace"] == kustomization["namespace"]


def test_namespace_enforces_restricted() -> None:
    labels = _manifests()["Namespace"]["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


def test_chart_fits_the_limit_range(renders: RenderCache) -> None:
    (limits,) = _manifests()["LimitRange"]["spec"]["limits"]
    checked = 0
    for render in renders.all():
        for workload in render.workloads():
            for container in containers(pod_spec(workload)):
                for resource, bound in container["resources"]["limits"].items():
                    assert quantity(bound) <= quantity(limits["max"][resource]), (render.scenario, container["name"])
                for resource, bound in container["resources"]["requests"].items():
                    assert quantity(bound) >= quantity(limits["min"][resource]), (render.scenario, container["name"])
                checked += 1
    assert checked > 0


def test_quota_fits_the_defaults_at_their_maxima(renders: RenderCache) -> None:
    """The default chart at every HPA maximum, plus one surge pod per Deployment in a rollout, fits the quota."""
    hard = _manifests()["ResourceQuota"]["spec"]["hard"]
    render = renders.get("default", *TENANTS[0])
    totals = {"requests.cpu": 0.0, "requests.memory": 0.0, "limits.cpu": 0.0, "limits.memory": 0.0, "pods": 0.0}
    for component in SERVICES:
        pods = render.values[component]["autoscaling"]["maxReplicas"] + 1
        for container in containers(pod_spec(render.workload(component))):
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    totals[f"{bound}.{resource}"] += pods * quantity(container["resources"][bound][resource])
        totals["pods"] += pods
    for key, total in totals.items():
        assert total <= quantity(hard[key]), (key, total, hard[key])
    assert hard["services.loadbalancers"] == "0" and hard["services.nodeports"] == "0"
