"""The chart renders, for every ci/ scenario and for two tenant namespaces, into objects of that namespace only."""

from __future__ import annotations

import re

import helm_python
import pytest
import yaml

from .manifests import CHART, CLUSTER_SCOPED, SCENARIOS, SERVICES, TENANTS, Render, RenderCache

EXPECTED_SCENARIOS = {
    "default",
    "tenant-a",
    "tenant-b",
    "autoscaling-off",
    "external-redis",
    "tool-containers",
}


def test_every_required_scenario_exists() -> None:
    assert EXPECTED_SCENARIOS <= set(SCENARIOS), f"missing ci/ scenarios: {EXPECTED_SCENARIOS - set(SCENARIOS)}"


def test_renders_well_formed_documents(rendered: Render) -> None:
    assert rendered.files, "the chart rendered no template"
    assert len(rendered.docs) >= 20, f"only {len(rendered.docs)} documents rendered"
    for doc in rendered.docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]["name"]
    kinds = {d["kind"] for d in rendered.docs}
    assert {"Deployment", "Service", "ServiceAccount", "NetworkPolicy", "ConfigMap"} <= kinds
    components = {
        w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] for w in rendered.workloads()
    }
    assert set(SERVICES) <= components


def test_no_two_objects_share_kind_and_name(rendered: Render) -> None:
    keys = [(d["kind"], d["metadata"]["name"]) for d in rendered.docs]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)


def test_every_object_lands_in_the_release_namespace(rendered: Render) -> None:
    for doc in rendered.docs:
        meta = doc["metadata"]
        if doc["kind"] in CLUSTER_SCOPED:
            # The only cluster-scoped object the chart may render is the tenant's own namespace.
            assert doc["kind"] == "Namespace", f"cluster-scoped {doc['kind']} {meta['name']}"
            assert meta["name"] == rendered.namespace
        else:
            assert meta.get("namespace") == rendered.namespace, f"{doc['kind']} {meta['name']}"
    for binding in rendered.of_kind("RoleBinding"):
        for subject in binding["subjects"]:
            assert subject.get("namespace", rendered.namespace) == rendered.namespace


def test_namespace_is_rendered_only_when_asked(rendered: Render) -> None:
    namespaces = rendered.of_kind("Namespace")
    if rendered.values["namespace"]["create"]:
        (namespace,) = namespaces
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        assert labels["kubernetes.io/metadata.name"] == rendered.namespace
    else:
        assert namespaces == []


def test_two_tenants_share_nothing(renders: RenderCache) -> None:
    (release_a, ns_a), (release_b, ns_b) = TENANTS
    a, b = renders.get("tenant-a", release_a, ns_a), renders.get("tenant-b", release_b, ns_b)
    objects_a = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in a.docs}
    objects_b = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in b.docs}
    assert objects_a and objects_b
    assert not objects_a & objects_b


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize(("release", "namespace"), TENANTS, ids=[ns for _, ns in TENANTS])
def test_helm_lint_strict_is_clean(scenario: str, release: str, namespace: str) -> None:
    values = yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text())
    report = helm_python.lint(CHART, values, strict=True, namespace=namespace, kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is INFO (only "icon is recommended" is tolerated); 2 and up are warnings and errors.
    problems = [m for m in report["messages"] if m["severity"] >= 2 or m["error"] != "icon is recommended"]
    assert problems == []


def test_values_validate_against_the_schema(chart: helm_python.Chart) -> None:
    for scenario in SCENARIOS:
        chart.validate_schema(yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text()))


def test_schema_has_no_remote_reference() -> None:
    text = (CHART / "values.schema.json").read_text()
    refs = re.findall(r'"\$ref"\s*:\s*"([^"]*)"', text)
    assert refs, "expected local $refs into #/definitions"
    assert all(ref.startswith("#/") for ref in refs), refs


def test_every_value_has_a_comment() -> None:
    """Every value in values.yaml has a "# --" comment (helm-docs style) above it or above the map it belongs to."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    ancestors: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    checked, undocumented = 0, []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(\s+\S.*)?$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent = len(match.group(1))
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        block = []
        for previous in reversed(lines[:number]):
            if not previous.strip().startswith("#"):
                break
            block.append(previous.strip())
        documented = any(c.startswith("# --") for c in block)
        if match.group(3) is not None:  # a value on the line: a leaf, or an inline map or list
            checked += 1
            if not (documented or any(d for _, d in ancestors)):
                undocumented.append(f"line {number + 1}: {line.strip()}")
        ancestors.append((indent, documented))
    assert undocumented == []
    # The check looked at the values (list items and nested maps count once, with their key).
    assert checked > 100


def test_image_tags_default_to_the_app_version(renders: RenderCache) -> None:
    render = renders.get("default", *TENANTS[0])
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for component in SERVICES:
        image = render.workload(component)["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image == f"altan-{component}:{app_version}"
