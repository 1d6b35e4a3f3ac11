"""The environment a rendered container starts with, and the ``altan.config.Settings`` a service builds from it."""

from __future__ import annotations

import base64
import os

import pytest

from altan.config import Settings

from .manifests import Doc, Render, env_of, pod_spec

# What an operator's existing Secret holds in the scenarios that name one.
EXISTING_SECRET = {
    "ALTAN_JWT_SECRET": "existing-hs256-secret-of-at-least-32-bytes",
    "ALTAN_MASTER_KEY": base64.b64encode(bytes(range(32))).decode(),
    "REDIS_URL": "redis://10.30.0.2:6379/0",
}
# The private key in an operator's delegationKeys.existingSecret (signing-key.pem) of the scenarios that name one:
# the pair of the public key ci/tenant-b-values.yaml lists.
EXISTING_SIGNING_KEY = """-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIM3u93zAc78gd8kC2D7YYlATW1iUvHWYgkgxkD+EIR5coAoGCCqGSM49
AwEHoUQDQgAEwHGq9sLLJF7w4E8xj16XYAX6T6+c4auFwGZwFbB0xMKHxDlA3HQH
E8nzrd3EqbW7Lx4oaSMxUuI+BdEEIGF3vg==
-----END EC PRIVATE KEY-----
"""


def container_environment(render: Render, container: Doc) -> dict[str, str]:
    """The variables the container starts with (envFrom first, env overriding it, as Kubernetes does)."""
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in render.of_kind("ConfigMap")}
    secrets = {
        s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
        for s in render.of_kind("Secret")
    }
    existing = render.values["secrets"]["existingSecret"]
    if existing:
        secrets[existing] = EXISTING_SECRET | {k: f"value-of-{k}" for k in render.values["secrets"]["bootstrapKeys"]}
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environment |= configmaps[source["configMapRef"]["name"]]
    for name, var in env_of(container).items():
        if "value" in var:
            environment[name] = var["value"]
            continue
        if "fieldRef" in var["valueFrom"]:  # the downward API: only the pod's namespace is used
            assert var["valueFrom"]["fieldRef"] == {"fieldPath": "metadata.namespace"}, name
            environment[name] = render.namespace
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["key"] in secrets[ref["name"]]:
            environment[name] = secrets[ref["name"]][ref["key"]]
        else:
            assert ref.get("optional"), f"{name}: {ref['name']}/{ref['key']} is missing"
    return environment


def clear_settings_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every variable Settings reads, so that only what a test sets counts."""
    for name in list(os.environ):
        if name.startswith("ALTAN_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def service_settings(
    render: Render, component: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, str], Settings]:
    """The environment of a service's container and the Settings it builds from it (as its ``__main__`` does)."""
    (container,) = pod_spec(render.workload(component))["containers"]
    environment = container_environment(render, container)
    with monkeypatch.context() as patch:
        clear_settings_environment(patch)
        for name, value in environment.items():
            patch.setenv(name, value)
        return environment, Settings()
