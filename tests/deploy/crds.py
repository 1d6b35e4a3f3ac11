"""Validating custom resources against their CustomResourceDefinitions' own OpenAPI schemas (vendored in crds/).

kubernetes-validate knows only the built-in kinds. A custom resource is checked here as the API server would check
it: its apiVersion must be one the CRD serves, its spec must match that version's ``openAPIV3Schema`` in strict mode
(a field the schema does not declare is an error unless the schema preserves unknown fields: the API server would
prune it silently, which hides a typo just as well), and its metadata must be a valid ObjectMeta (checked by
kubernetes-validate on a ConfigMap that carries it). CEL rules (``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

CRD_DIR = Path(__file__).with_name("crds")

Doc = dict[str, Any]

# The string formats the API server checks that matter here: "duration" is Go's time.ParseDuration ("30s", "1h30m").
_GO_DURATION = re.compile(r"^[-+]?(0|([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h))+$")
_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("duration")(lambda value: not isinstance(value, str) or bool(_GO_DURATION.match(value)))


@functools.cache
def definitions() -> dict[tuple[str, str], Doc]:
    """Every vendored CRD by (group, kind)."""
    found: dict[tuple[str, str], Doc] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if crd is None:
                continue
            assert crd["kind"] == "CustomResourceDefinition", path
            key = (crd["spec"]["group"], crd["spec"]["names"]["kind"])
            assert key not in found, f"{key} twice"
            found[key] = crd
    return found


def is_custom(doc: Doc) -> bool:
    """Does the document belong to an API group that a vendored CRD defines?"""
    group = str(doc.get("apiVersion", "")).rpartition("/")[0]
    return any(g == group for g, _ in definitions())


def _strict(schema: Any) -> Any:
    """The schema with every object closed to undeclared fields, and ``nullable`` as JSON Schema says it."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(group: str, kind: str, version: str) -> jsonschema.Draft7Validator | None:
    crd = definitions().get((group, kind))
    if crd is None:
        return None
    for served in crd["spec"]["versions"]:
        if served["name"] == version and served.get("served", False):
            schema = _strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
            # Every object has these, whether its CRD says so or not (Istio's do not); metadata is checked below.
            schema["properties"].update(
                apiVersion={"const": f"{group}/{version}"}, kind={"const": kind}, metadata={"type": "object"}
            )
            schema.setdefault("required", [])
            schema["required"] = sorted({*schema["required"], "apiVersion", "kind", "metadata"})
            return jsonschema.Draft7Validator(schema, format_checker=_FORMATS)
    return None


def custom_resource_errors(doc: Doc, kubernetes_version: str) -> list[str]:
    """Why the API server would refuse (or silently change) this custom resource; [] when it would not."""
    group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
    kind = str(doc.get("kind"))
    validator = _validator(group, kind, version)
    if validator is None:
        if (group, kind) in definitions():
            return [f"{group}/{version} is not a served version of {kind}"]
        return [f"no vendored CRD defines {kind} in {group}"]
    errors = [
        f"{e.message} at {'/'.join(map(str, e.absolute_path)) or '(root)'}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
    try:
        kubernetes_validate.validate(carrier, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"metadata: {exc.message} at {'/'.join(map(str, exc.path))}")
    return errors
