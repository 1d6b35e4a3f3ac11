"""The environment the chart gives each service container is one that ``altan.config.Settings`` accepts: every
rendered scenario, with the ConfigMap and the Secret resolved as the kubelet would."""

from __future__ import annotations

import base64
import os

import pytest

from altan.config import Settings

from .manifests import SERVICES, Doc, Render, env_of, pod_spec

# What an operator's existing Secret holds in the scenarios that name one.
EXISTING_SECRET = {
    "ALTAN_JWT_SECRET": "existing-hs256-secret-of-at-least-32-bytes",
    "ALTAN_MASTER_KEY": base64.b64encode(bytes(range(32))).decode(),
    "REDIS_URL": "redis://10.30.0.2:6379/0",
}


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
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["key"] in secrets[ref["name"]]:
            environment[name] = secrets[ref["name"]][ref["key"]]
        else:
            assert ref.get("optional"), f"{name}: {ref['name']}/{ref['key']} is missing"
    return environment


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("ALTAN_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    return monkeypatch


def test_settings_accept_the_rendered_environment(rendered: Render, clean_environ: pytest.MonkeyPatch) -> None:
    for component in SERVICES:
        (container,) = pod_spec(rendered.workload(component))["containers"]
        environment = container_environment(rendered, container)
        with clean_environ.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            settings = Settings()
        assert settings.bind_host == "0.0.0.0"
        assert settings.jwt_audience == rendered.values["config"]["jwt"]["audience"]
        if component == "gateway":
            assert (settings.http_host, settings.http_port) == ("0.0.0.0", rendered.values["gateway"]["httpPort"])
            assert settings.grpc_port == rendered.values["gateway"]["grpcPort"]
            assert settings.max_body_bytes == rendered.values["gateway"]["maxBodyBytes"]
        else:
            assert getattr(settings, f"{component}_port") == rendered.values[component]["port"]
        if component == "integrator":
            assert len(settings.master_key_bytes()) == 32
            assert str(settings.data_dir) == "/var/lib/altan"
        redis = rendered.values["redis"]["url"] or rendered.values["redis"]["urlInExistingSecret"]
        assert (settings.redis_url is not None) == bool(redis and component != "gateway"), component
