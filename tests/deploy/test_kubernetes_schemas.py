"""Every rendered object, and every bootstrap manifest, is valid against the Kubernetes API schemas of the oldest and
newest versions we support, in strict mode (unknown fields are errors); custom resources against their CRDs' own
schemas, vendored in crds/ (tests/deploy/crds.py). A kind or apiVersion the version does not
serve (SchemaNotFoundError) is a failure, not a skip."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from .crds import custom_resource_errors, definitions, is_custom
from .manifests import BOOTSTRAP, KUBERNETES_VERSIONS, Doc, Render, RenderCache


def _schema_errors(docs: list[Doc], version: str) -> list[str]:
    errors = []
    for doc in docs:
        name = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if is_custom(doc):  # cert-manager, prometheus-operator, GKE managed Prometheus, Istio: their CRDs' schemas
            errors.extend(f"{name}: {problem}" for problem in custom_resource_errors(doc, version))
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: no schema in Kubernetes {version}: {exc}")
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {exc.message} at {'/'.join(map(str, exc.path))}")
    return errors


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_match_the_api_schemas(rendered: Render, version: str) -> None:
    assert rendered.docs
    assert _schema_errors(rendered.docs, version) == []


def bootstrap_documents() -> list[Doc]:
    docs: list[Doc] = []
    for path in sorted(BOOTSTRAP.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue  # not a Kubernetes object; test_bootstrap.py checks it
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_bootstrap_manifests_match_the_api_schemas(version: str) -> None:
    docs = bootstrap_documents()
    assert len(docs) >= 3
    assert _schema_errors(docs, version) == []


def test_the_validator_catches_a_misspelt_field(rendered: Render) -> None:
    """Strict mode is what finds a typo such as imagePullPolcy; prove it does on our own Deployment."""
    deployment = rendered.of_kind("Deployment")[0]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["imagePullPolcy"] = container.pop("imagePullPolicy")
    assert _schema_errors([broken], KUBERNETES_VERSIONS[0])


def test_a_removed_api_version_is_a_failure() -> None:
    """An API the version no longer serves must fail, not pass silently (autoscaling/v2beta2 went in 1.26)."""
    hpa = {
        "apiVersion": "autoscaling/v2beta2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "x", "namespace": "t"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 2},
    }
    assert _schema_errors([hpa], "1.30.0")


def _custom_resources(renders: RenderCache) -> dict[tuple[str, str], Doc]:
    """One rendered custom resource of each (group, kind), from every scenario and tenant."""
    found: dict[tuple[str, str], Doc] = {}
    for render in renders.all():
        for doc in render.docs:
            if is_custom(doc):
                found.setdefault((doc["apiVersion"].rpartition("/")[0], doc["kind"]), doc)
    return found


def test_every_vendored_crd_checks_something_the_chart_renders(renders: RenderCache) -> None:
    """No schema sits unused, and no custom kind the chart renders goes unchecked."""
    assert set(_custom_resources(renders)) == set(definitions())


def _misspelt(doc: Doc) -> Doc:
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["selectr"] = broken["spec"].pop("selector", {})
    return broken


def test_the_crd_schemas_catch_a_misspelt_field_in_every_custom_kind(renders: RenderCache) -> None:
    for key, doc in _custom_resources(renders).items():
        assert _schema_errors([doc], KUBERNETES_VERSIONS[0]) == [], key
        errors = _schema_errors([_misspelt(doc)], KUBERNETES_VERSIONS[0])
        assert any("selectr" in e for e in errors), (key, errors)


@pytest.mark.parametrize(
    ("kind", "path", "value", "needle"),
    [
        ("PeerAuthentication", ("spec", "mtls", "mode"), "STRICTLY", "STRICTLY"),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "for"), "five minutes", "five minutes"),
        ("Certificate", ("spec", "privateKey", "algorithm"), "DSA", "DSA"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "scheme"), "gopher", "gopher"),
        ("PodMonitoring", ("spec", "endpoints", 0, "interval"), "often", "often"),
        ("Issuer", ("metadata", "labelz"), "x", "labelz"),  # metadata is ObjectMeta, strictly
    ],
)
def test_the_crd_schemas_catch_bad_values(
    renders: RenderCache, kind: str, path: tuple[str | int, ...], value: str, needle: str
) -> None:
    doc = next(d for (_, k), d in _custom_resources(renders).items() if k == kind)
    broken = yaml.safe_load(yaml.safe_dump(doc))
    target = broken
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    errors = _schema_errors([broken], KUBERNETES_VERSIONS[0])
    assert any(needle in e for e in errors), errors


def test_an_unserved_version_of_a_custom_kind_is_a_failure(renders: RenderCache) -> None:
    doc = next(d for (_, k), d in _custom_resources(renders).items() if k == "Certificate")
    old = {**doc, "apiVersion": "cert-manager.io/v1alpha2"}
    assert any("not a served version" in e for e in _schema_errors([old], KUBERNETES_VERSIONS[0]))
