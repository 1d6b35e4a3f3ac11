"""ALTAN_INTERNAL_KEY in the chart: one Secret generated per install (or the operator's own,
internalKey.existingSecret), read by secretKeyRef by the agent, tool and integrator services and every tool
container, never by the gateway, and its value nowhere but in that Secret. (test_policy checks the Secret references
of every scenario; test_settings that the services start with what they are given.)"""

from __future__ import annotations

import base64
import copy
from typing import Any

import helm_python
import pytest

from altan.config import Settings

from .environment import clear_settings_environment, service_settings
from .manifests import SERVICES, Render, RenderCache, containers, env_of, pod_labels, pod_spec, render, scenario_values

KEY = "ALTAN_INTERNAL_KEY"


def _internal_key_refs(rendered: Render) -> dict[str, dict[str, Any]]:
    """component (tool-<name> for a tool container) -> its ALTAN_INTERNAL_KEY secretKeyRef."""
    refs = {}
    for workload in rendered.workloads():
        component = pod_labels(workload)["app.kubernetes.io/component"]
        for container in containers(pod_spec(workload)):
            var = env_of(container).get(KEY)
            if var is not None:
                assert set(var) == {"name", "valueFrom"} and set(var["valueFrom"]) == {"secretKeyRef"}, component
                refs[component] = var["valueFrom"]["secretKeyRef"]
    return refs


def _generated(rendered: Render) -> tuple[str, str]:
    """(name, decoded value) of the internal key Secret the chart rendered."""
    (secret,) = [s for s in rendered.of_kind("Secret") if KEY in s.get("data", {})]
    return secret["metadata"]["name"], base64.b64decode(secret["data"][KEY]).decode()


@pytest.mark.parametrize("scenario", ["default", "tool-containers"])
def test_every_component_but_the_gateway_reads_the_generated_key(renders: RenderCache, scenario: str) -> None:
    rendered = renders.get(scenario, "altan", "tenant-alpha")
    name, value = _generated(rendered)
    assert name == "altan-internal-key"
    assert len(value.encode()) >= 48 and value.isalnum()
    refs = _internal_key_refs(rendered)
    tool_containers = {f"tool-{tc['name']}" for tc in rendered.values["toolContainers"]}
    assert set(refs) == {"agent", "tool", "integrator"} | tool_containers
    assert "gateway" in SERVICES and "gateway" not in refs
    for component, ref in refs.items():
        assert ref == {"name": name, "key": KEY, "optional": False}, component
    if scenario == "tool-containers":
        assert tool_containers


def test_the_value_is_nowhere_but_in_its_secret(renders: RenderCache) -> None:
    rendered = renders.get("tool-containers", "altan", "tenant-alpha")
    name, value = _generated(rendered)
    encoded = base64.b64encode(value.encode()).decode()
    others = [d for d in rendered.docs if not (d["kind"] == "Secret" and d["metadata"]["name"] == name)]
    text = str(others) + "".join(f for path, f in rendered.files.items() if path.endswith("NOTES.txt"))
    assert value not in text and encoded not in text
    for configmap in rendered.of_kind("ConfigMap"):
        assert KEY not in (configmap.get("data") or {})


def test_each_install_gets_its_own_key(renders: RenderCache) -> None:
    # (helm template has no cluster to look into: each render generates one; an upgrade keeps the installed one)
    assert (
        _generated(renders.get("default", "altan", "tenant-alpha"))[1]
        != _generated(renders.get("default", "beta-altan", "tenant-beta"))[1]
    )


def test_the_services_accept_the_generated_key(renders: RenderCache, monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = renders.get("default", "altan", "tenant-alpha")
    _, value = _generated(rendered)
    for component in ("agent", "tool", "integrator"):
        environment, settings = service_settings(rendered, component, monkeypatch)
        assert environment[KEY] == value
        assert settings.internal_key is not None and settings.internal_key.get_secret_value() == value
    environment, settings = service_settings(rendered, "gateway", monkeypatch)
    assert KEY not in environment and settings.internal_key is None


def test_an_existing_secret_is_used_instead(chart: helm_python.Chart) -> None:
    values = copy.deepcopy(scenario_values("tool-containers"))
    values["internalKey"] = {"existingSecret": "operator-internal-key"}
    rendered = render(chart, values, release="altan", namespace="tenant-alpha")
    assert not [s for s in rendered.of_kind("Secret") if KEY in s.get("data", {})]
    refs = _internal_key_refs(rendered)
    assert "gateway" not in refs and {"agent", "tool", "integrator"} <= set(refs)
    assert len(refs) == 3 + len(values["toolContainers"])
    for component, ref in refs.items():
        assert ref == {"name": "operator-internal-key", "key": KEY, "optional": False}, component


def test_a_malformed_existing_secret_name_is_refused(chart: helm_python.Chart) -> None:
    values = copy.deepcopy(scenario_values("default"))
    values["internalKey"] = {"existingSecret": "Not A Name"}
    with pytest.raises(Exception, match="existingSecret"):
        render(chart, values, release="altan", namespace="tenant-alpha")


def test_settings_refuse_a_short_internal_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Why the chart generates 48 characters, and docs/operations.md asks at least 32 bytes of an operator's own.
    clear_settings_environment(monkeypatch)
    monkeypatch.setenv(KEY, "x" * 31)
    with pytest.raises(ValueError, match="32"):
        Settings()
