"""skaffold.yaml (no skaffold binary here): it parses, builds the four images from their Dockerfiles, and deploys the
chart with each built image mapped onto that service's image values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from .manifests import CHART, REPO, SERVICES, parse_documents, pod_spec

SKAFFOLD = REPO / "skaffold.yaml"


@pytest.fixture(scope="module")
def skaffold() -> dict[str, Any]:
    config = yaml.safe_load(SKAFFOLD.read_text())
    assert config["kind"] == "Config"
    assert re.fullmatch(r"skaffold/v4beta\d+", config["apiVersion"]), config["apiVersion"]
    return config


def _default(template: str) -> str:
    """The fallback of a skaffold template such as '{{default "x" .ENV}}' (or the string itself)."""
    match = re.fullmatch(r'\{\{\s*default\s+"([^"]+)"\s+\.\w+\s*\}\}', template)
    return match.group(1) if match else template


def _release(skaffold: dict[str, Any]) -> dict[str, Any]:
    (release,) = skaffold["deploy"]["helm"]["releases"]
    return release


def test_builds_the_four_images_from_their_dockerfiles(skaffold: dict[str, Any]) -> None:
    artifacts = {a["image"]: a for a in skaffold["build"]["artifacts"]}
    assert set(artifacts) == {f"altan-{s}" for s in SERVICES}
    for service in SERVICES:
        artifact = artifacts[f"altan-{service}"]
        assert artifact["context"] == "."
        dockerfile = artifact["docker"]["dockerfile"]
        assert dockerfile == f"deploy/docker/{service}.Dockerfile"
        assert (REPO / dockerfile).is_file()


def test_image_names_match_the_chart_values(skaffold: dict[str, Any]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    templates = _release(skaffold)["setValueTemplates"]
    for service in SERVICES:
        image = f"altan-{service}"
        assert values[service]["image"]["repository"] == image
        key = image.replace("-", "_")
        assert templates[f"{service}.image.repository"] == f"{{{{.IMAGE_REPO_{key}}}}}"
        assert templates[f"{service}.image.tag"] == f"{{{{.IMAGE_TAG_{key}}}}}"
    assert len(templates) == 2 * len(SERVICES)


def test_deploys_the_chart(skaffold: dict[str, Any]) -> None:
    release = _release(skaffold)
    assert (REPO / release["chartPath"]).resolve() == CHART
    assert (REPO / release["chartPath"] / "Chart.yaml").is_file()
    for values_file in release["valuesFiles"]:
        assert (REPO / _default(values_file)).is_file(), values_file
    assert _default(release["namespace"])


def test_has_a_dev_profile(skaffold: dict[str, Any]) -> None:
    profiles = {p["name"]: p for p in skaffold["profiles"]}
    assert "dev" in profiles
    for patch in profiles["dev"].get("patches", []):
        node: Any = skaffold
        *parents, _ = patch["path"].strip("/").split("/")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert isinstance(node, dict | list), patch["path"]


def test_what_skaffold_deploys_renders(skaffold: dict[str, Any], chart: helm_python.Chart) -> None:
    """The chart with skaffold's values file and images as skaffold would set them (a registry and a build tag)."""
    release = _release(skaffold)
    values: dict[str, Any] = {}
    for values_file in release["valuesFiles"]:
        values |= yaml.safe_load((REPO / _default(values_file)).read_text())
    for service in SERVICES:
        values.setdefault(service, {})["image"] = {
            "repository": f"europe-docker.pkg.dev/acme/dev/altan-{service}",
            "tag": "v0.1.0-12-gabc1234-dirty",
        }
    docs = parse_documents(chart.render(values, name=release["name"], namespace=_default(release["namespace"])))
    images = {pod_spec(d)["containers"][0]["image"] for d in docs if d["kind"] == "Deployment"}
    assert images == {f"europe-docker.pkg.dev/acme/dev/altan-{s}:v0.1.0-12-gabc1234-dirty" for s in SERVICES}


def test_docker_context_excludes_what_images_do_not_need() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "**" in ignore
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for dockerfile in (REPO / "deploy" / "docker").glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                copied |= {Path(src).as_posix().rstrip("/") for src in line.split()[1:-1]}
    assert copied
    assert copied <= allowed
