"""Rendering the Helm chart offline and reading the Kubernetes objects it produces.

The chart is rendered by the Helm v4 library itself (helm-python-sdk), so what is checked here is what
``helm install`` would send to the API server.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "altan"
BOOTSTRAP = REPO / "deploy" / "k8s"
SCENARIOS: tuple[str, ...] = tuple(
    sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
)
# Two tenants: (release name, namespace). The second release name contains the chart name, which changes fullname.
TENANTS: tuple[tuple[str, str], ...] = (("altan", "tenant-alpha"), ("beta-altan", "tenant-beta"))
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SERVICES = ("gateway", "agent", "tool", "integrator")

# Kinds without a namespace (the chart may only render a Namespace among these).
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "IngressClass",
        "MutatingWebhookConfiguration",
        "PersistentVolume",
        "PriorityClass",
        "StorageClass",
        "ValidatingWebhookConfiguration",
    }
)
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})

Doc = dict[str, Any]


def scenario_values(scenario: str) -> dict[str, Any]:
    """The values of one ci/ scenario."""
    return yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text()) or {}


def parse_documents(files: Mapping[str, str]) -> list[Doc]:
    """Every YAML document of the rendered templates, in template order; a YAML error fails loudly."""
    docs: list[Doc] = []
    for path in sorted(files):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(files[path]):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ValueError(f"{path}: a document is a {type(doc).__name__}, not a mapping")
            docs.append(doc)
    return docs


@dataclass(frozen=True)
class Render:
    """One rendering of the chart: for a scenario, a release name and a namespace."""

    scenario: str
    release: str
    namespace: str
    values: dict[str, Any]  # the chart's defaults merged with the scenario's values
    files: dict[str, str]
    docs: list[Doc] = field(repr=False)

    def of_kind(self, *kinds: str) -> list[Doc]:
        return [d for d in self.docs if d.get("kind") in kinds]

    def get(self, kind: str, name: str) -> Doc | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def workloads(self) -> list[Doc]:
        return [d for d in self.docs if d.get("kind") in WORKLOAD_KINDS]

    def workload(self, component: str) -> Doc:
        """The workload whose pods carry app.kubernetes.io/component=<component>."""
        found = [w for w in self.workloads() if pod_labels(w).get("app.kubernetes.io/component") == component]
        assert len(found) == 1, f"{len(found)} workloads for component {component}"
        return found[0]

    def as_yaml(self) -> str:
        return yaml.safe_dump_all(self.docs, sort_keys=False)


def render(
    chart: helm_python.Chart, values: dict[str, Any], *, release: str, namespace: str, scenario: str = "adhoc"
) -> Render:
    """Render the chart as ``helm install`` would (schema validated, fail guards evaluated)."""
    files = chart.render(values, name=release, namespace=namespace, is_install=True)
    return Render(
        scenario=scenario,
        release=release,
        namespace=namespace,
        values=chart.merge_values(values),
        files=files,
        docs=parse_documents(files),
    )


class RenderCache:
    """Renders each (scenario, tenant) once per test session."""

    def __init__(self, chart: helm_python.Chart) -> None:
        self._chart = chart
        self._renders: dict[tuple[str, str, str], Render] = {}

    def get(self, scenario: str, release: str, namespace: str) -> Render:
        key = (scenario, release, namespace)
        if key not in self._renders:
            self._renders[key] = render(
                self._chart, scenario_values(scenario), release=release, namespace=namespace, scenario=scenario
            )
        return self._renders[key]

    def all(self) -> Iterator[Render]:
        for scenario in SCENARIOS:
            for release, namespace in TENANTS:
                yield self.get(scenario, release, namespace)


def pod_template(workload: Doc) -> Doc:
    return workload["spec"]["template"]


def pod_spec(workload: Doc) -> Doc:
    return pod_template(workload)["spec"]


def pod_labels(workload: Doc) -> dict[str, str]:
    return pod_template(workload)["metadata"].get("labels", {})


def containers(spec: Doc) -> list[Doc]:
    """Every container of a pod spec: init, regular and ephemeral."""
    return [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]


def container_ports(spec: Doc) -> list[Doc]:
    return [p for c in spec["containers"] for p in c.get("ports", [])]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def selector_matches(selector: Doc | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions); an empty selector matches all."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
