"""Every rendered object, and every bootstrap manifest, is valid against the Kubernetes API schemas of the oldest and
newest versions we support, in strict mode (unknown fields are errors). A kind or apiVersion the version does not
serve (SchemaNotFoundError) is a failure, not a skip."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from .manifests import BOOTSTRAP, KUBERNETES_VERSIONS, Doc, Render


def _schema_errors(docs: list[Doc], version: str) -> list[str]:
    errors = []
    for doc in docs:
        name = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
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
