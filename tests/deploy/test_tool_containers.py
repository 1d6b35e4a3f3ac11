"""Tool containers from chart values: a Deployment and a Service each, the Service labelled so that the tool
service's discovery (services/tool/kubernetes_discovery.py) finds it, on the port it reaches, with the environment
`altan serve-tools` needs to verify callers."""

from __future__ import annotations

import pytest

from altan.config import Settings
from services.tool.kubernetes_discovery import LABEL_SELECTOR, service_address

from .environment import clear_settings_environment, container_environment
from .manifests import Render, RenderCache, env_of, pod_labels, pod_spec, selector_matches


def test_each_tool_container_has_a_discoverable_service(rendered: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    key, value = LABEL_SELECTOR.split("=")
    services = [s for s in rendered.of_kind("Service") if s["metadata"]["labels"].get(key) == value]
    assert len(services) == len(rendered.values["toolContainers"])
    for tc in rendered.values["toolContainers"]:
        workload = rendered.workload(f"tool-{tc['name']}")
        (service,) = [
            s for s in services if selector_matches({"matchLabels": s["spec"]["selector"]}, pod_labels(workload))
        ]
        address = service_address(service | {"metadata": service["metadata"] | {"namespace": rendered.namespace}})
        assert address == f"{service['metadata']['name']}.{rendered.namespace}.svc:{tc['port']}"
        (container,) = pod_spec(workload)["containers"]
        assert container["ports"] == [{"name": "grpc", "containerPort": tc["port"], "protocol": "TCP"}]
        assert container["readinessProbe"]["grpc"]["port"] == tc["port"]
        # Its own variables, and the public keys of task delegations (test_delegation_keys checks the file).
        assert {k: v["value"] for k, v in env_of(container).items() if "value" in v} == {
            e["name"]: e["value"] for e in tc.get("env", [])
        } | {"ALTAN_DELEGATION_PUBLIC_KEYS_FILE": "/etc/altan/delegation-public/public-keys.pem"}
        # What `altan serve-tools` builds from it: listening on every address, verifying the install's tokens.
        environment = container_environment(rendered, container)
        with monkeypatch.context() as patch:
            clear_settings_environment(patch)
            for name, setting in environment.items():
                patch.setenv(name, setting)
            settings = Settings()
        assert settings.bind_host == "0.0.0.0"
        assert settings.jwt_secret is not None or settings.jwt_jwks_url or settings.jwt_jwks_file


def test_the_tool_service_discovers_when_told_to(rendered: Render) -> None:
    (container,) = pod_spec(rendered.workload("tool"))["containers"]
    env = env_of(container)
    if rendered.values["tool"]["discovery"]["enabled"]:
        assert env["ALTAN_TOOL_DISCOVERY"]["value"] == "kubernetes"
        assert env["ALTAN_TOOL_DISCOVERY_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    else:
        assert "ALTAN_TOOL_DISCOVERY" not in env


def test_the_tool_containers_scenario_deploys_the_weather_example(renders: RenderCache) -> None:
    rendered = renders.get("tool-containers", "altan", "tenant-alpha")
    (container,) = pod_spec(rendered.workload("tool-weather"))["containers"]
    assert container["image"] == "altan-weather-tool:0.1.0"
    assert any(tc.get("egressInternet") for tc in rendered.values["toolContainers"])
    assert not all(tc.get("egressInternet") for tc in rendered.values["toolContainers"])
