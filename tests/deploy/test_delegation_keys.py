"""The delegation key pair in the chart: the agent's private key in one Secret (generated per install, or the
operator's delegationKeys.existingSecret) mounted into the agent only; the public keys in a ConfigMap mounted into
the agent, tool and integrator services and every tool container; the gateway gets neither, and the private key is
nowhere but in its Secret. The services start with what they are given and accept the agent's delegations. (The
upgrade path, lookup keeping the key, needs a cluster: docs/operations.md.)"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import helm_python
import pytest

from altan.auth import TokenVerifier, issue_delegation
from altan.config import Settings
from altan.delegation import PUBLIC_KEYS_SETTING, SIGNING_KEY_SETTING, agent_signing_key, load_public_keys
from altan.delegation import load_signing_key as load_key_file

from .environment import EXISTING_SIGNING_KEY, service_settings
from .manifests import (
    SERVICES,
    Doc,
    Render,
    RenderCache,
    containers,
    env_of,
    pod_labels,
    pod_spec,
    render,
    scenario_values,
)

SIGNING = "signing-key.pem"
PUBLIC = "public-keys.pem"


def _generated(rendered: Render) -> tuple[str, str]:
    """(name, PEM) of the signing key Secret the chart rendered."""
    (secret,) = [s for s in rendered.of_kind("Secret") if SIGNING in s.get("data", {})]
    return secret["metadata"]["name"], base64.b64decode(secret["data"][SIGNING]).decode()


def _public_keys(rendered: Render) -> tuple[str, str]:
    (configmap,) = [c for c in rendered.of_kind("ConfigMap") if PUBLIC in c.get("data", {})]
    return configmap["metadata"]["name"], configmap["data"][PUBLIC]


def _mounted(rendered: Render) -> dict[str, dict[str, Any]]:
    """component -> {"env": its delegation variables, "files": mount path -> (kind, name, keys)} of every workload."""
    found = {}
    for workload in rendered.workloads():
        component = pod_labels(workload)["app.kubernetes.io/component"]
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers(spec):
            env = {k: v.get("value") for k, v in env_of(container).items() if k.startswith("ALTAN_DELEGATION_")}
            files = {}
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "secret" in volume:
                    source = ("Secret", volume["secret"]["secretName"], volume["secret"].get("items"))
                elif "configMap" in volume:
                    source = ("ConfigMap", volume["configMap"]["name"], volume["configMap"].get("items"))
                else:
                    continue
                files[mount["mountPath"]] = source
            found[component] = {"env": env, "files": files}
    return found


def _file_source(mounted: dict[str, Any], path: str) -> tuple[str, str, Any]:
    directory, _, name = path.rpartition("/")
    kind, source, items = mounted["files"][directory]
    assert items is None or [i["path"] for i in items] == [name]
    return kind, source, items


@pytest.mark.parametrize("scenario", ["default", "tool-containers", "tenant-b"])
def test_the_private_key_reaches_the_agent_only_and_the_public_keys_every_verifier(
    renders: RenderCache, scenario: str
) -> None:
    rendered = renders.get(scenario, "altan", "tenant-alpha")
    existing = rendered.values["delegationKeys"]["existingSecret"]
    secret_name = existing or _generated(rendered)[0]
    configmap_name, _ = _public_keys(rendered)
    mounted = _mounted(rendered)
    tool_containers = {f"tool-{tc['name']}" for tc in rendered.values["toolContainers"]}
    verifiers = {"agent", "tool", "integrator"} | tool_containers
    assert set(mounted) == set(SERVICES) | tool_containers
    for component, seen in mounted.items():
        sources = {(kind, name) for kind, name, _ in seen["files"].values()}
        if component == "agent":
            assert set(seen["env"]) == {SIGNING_KEY_SETTING, PUBLIC_KEYS_SETTING}
            kind, name, items = _file_source(seen, seen["env"][SIGNING_KEY_SETTING])
            assert (kind, name) == ("Secret", secret_name)
            assert items == [{"key": SIGNING, "path": SIGNING}]  # only that key of an operator's Secret
        elif component in verifiers:
            assert set(seen["env"]) == {PUBLIC_KEYS_SETTING}, component
        else:
            assert component == "gateway"
            assert seen["env"] == {}
            assert ("ConfigMap", configmap_name) not in sources
        assert ("Secret", secret_name) not in sources or component == "agent", component
        if component in verifiers:
            kind, name, _ = _file_source(seen, seen["env"][PUBLIC_KEYS_SETTING])
            assert (kind, name) == ("ConfigMap", configmap_name), component
    if scenario == "tool-containers":
        assert tool_containers


def test_verifiers_get_public_material_only_and_the_private_key_is_nowhere_else(renders: RenderCache) -> None:
    rendered = renders.get("tool-containers", "altan", "tenant-alpha")
    name, pem = _generated(rendered)
    _, public = _public_keys(rendered)
    assert "PRIVATE" not in public and public.startswith("-----BEGIN CERTIFICATE-----")
    body = "".join(pem.strip().splitlines()[1:-1])
    others = [d for d in rendered.docs if not (d["kind"] == "Secret" and d["metadata"]["name"] == name)]
    text = str(others) + "".join(f for path, f in rendered.files.items() if path.endswith("NOTES.txt"))
    assert body not in text and base64.b64encode(pem.encode()).decode() not in text
    assert "PRIVATE KEY" not in text


def test_each_install_gets_its_own_key(renders: RenderCache) -> None:
    # (helm template has no cluster to look into: each render generates one; an upgrade keeps the installed one)
    assert (
        _generated(renders.get("default", "altan", "tenant-alpha"))[1]
        != _generated(renders.get("default", "beta-altan", "tenant-beta"))[1]
    )


def setting_field(variable: str) -> str:
    field = variable.removeprefix("ALTAN_").lower()
    assert field in Settings.model_fields
    return field


def _files_of(rendered: Render, component: str, tmp_path: Path, signing_key: str) -> dict[str, str]:
    """The delegation files a component's container sees, written under tmp_path: setting -> local path."""
    seen = _mounted(rendered)[component]
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in rendered.of_kind("ConfigMap")}
    local = {}
    for setting, path in seen["env"].items():
        kind, name, _ = _file_source(seen, path)
        content = configmaps[name][PUBLIC] if kind == "ConfigMap" else signing_key
        target = tmp_path / component / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        local[setting] = str(target)
    return local


@pytest.mark.parametrize("scenario", ["default", "tenant-b"])
def test_the_services_start_with_the_keys_and_accept_the_agents_delegations(
    renders: RenderCache, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scenario: str
) -> None:
    rendered = renders.get(scenario, "altan", "tenant-alpha")
    existing = rendered.values["delegationKeys"]["existingSecret"]
    signing_key = EXISTING_SIGNING_KEY if existing else _generated(rendered)[1]
    token = ""
    for component in ("agent", "tool", "integrator", "gateway"):
        files = _files_of(rendered, component, tmp_path, signing_key)
        environment, settings = service_settings(rendered, component, monkeypatch)
        assert {k for k in environment if k.startswith("ALTAN_DELEGATION_")} == set(files)
        # The mounted files, at their place in the container, are here under tmp_path.
        local = {setting_field(name): Path(path) for name, path in files.items()}
        settings = settings.model_copy(update=local)
        if component == "agent":
            key = agent_signing_key(settings)  # also checks the key is among the public ones
            assert key is not None
            token = issue_delegation(key, tenant="acme", sub="alice", role="member", task_id="tsk_1", ttl=60)
        if component == "gateway":
            assert settings.delegation_public_keys_file is None and settings.delegation_signing_key_file is None
            continue
        assert settings.delegation_public_keys_file is not None
        assert load_public_keys(settings.delegation_public_keys_file)
        caller = TokenVerifier(settings, accept_delegation=True).verify(f"Bearer {token}")
        assert caller.delegated and caller.tenant_id == "acme", component


def test_the_generated_key_is_p256_and_its_certificate_carries_its_public_key(
    renders: RenderCache, tmp_path: Path
) -> None:
    rendered = renders.get("default", "altan", "tenant-alpha")
    private, public = tmp_path / SIGNING, tmp_path / PUBLIC
    private.write_text(_generated(rendered)[1])
    public.write_text(_public_keys(rendered)[1])
    assert list(load_public_keys(public)) == [load_key_file(private).kid]


def test_an_existing_secret_is_used_instead_with_its_public_keys(chart: helm_python.Chart) -> None:
    values: dict[str, Doc] = copy.deepcopy(scenario_values("tool-containers"))
    public = scenario_values("tenant-b")["delegationKeys"]["publicKeys"]
    values["delegationKeys"] = {"existingSecret": "operator-delegation-key", "publicKeys": public}
    rendered = render(chart, values, release="altan", namespace="tenant-alpha")
    assert not [s for s in rendered.of_kind("Secret") if SIGNING in s.get("data", {})]
    assert _public_keys(rendered)[1].strip() == public.strip()
    mounted = _mounted(rendered)
    kind, name, _ = _file_source(mounted["agent"], mounted["agent"]["env"][SIGNING_KEY_SETTING])
    assert (kind, name) == ("Secret", "operator-delegation-key")
    for component, seen in mounted.items():
        if component != "agent":
            assert ("Secret", "operator-delegation-key") not in {(k, n) for k, n, _ in seen["files"].values()}


def test_an_existing_secret_without_public_keys_is_refused(chart: helm_python.Chart) -> None:
    values = copy.deepcopy(scenario_values("default"))
    values["delegationKeys"] = {"existingSecret": "operator-delegation-key"}
    with pytest.raises(Exception, match=r"delegationKeys\.existingSecret needs delegationKeys\.publicKeys"):
        render(chart, values, release="altan", namespace="tenant-alpha")


def test_a_malformed_existing_secret_name_is_refused(chart: helm_python.Chart) -> None:
    values = copy.deepcopy(scenario_values("default"))
    values["delegationKeys"] = {"existingSecret": "Not A Name", "publicKeys": "x"}
    with pytest.raises(Exception, match="existingSecret"):
        render(chart, values, release="altan", namespace="tenant-alpha")


def test_a_rotation_lists_both_public_keys_and_rolls_the_verifiers(
    renders: RenderCache, chart: helm_python.Chart
) -> None:
    before = renders.get("tenant-b", "altan", "tenant-alpha")
    values = copy.deepcopy(scenario_values("tenant-b"))
    extra = _public_keys(renders.get("default", "altan", "tenant-alpha"))[1]  # another key, as a certificate
    values["delegationKeys"]["publicKeys"] += extra
    after = render(chart, values, release="altan", namespace="tenant-alpha")
    assert len(_public_keys(after)[1].split("-----BEGIN ")) == 3
    for component in ("agent", "tool", "integrator"):
        old = before.workload(component)["spec"]["template"]["metadata"]["annotations"]["checksum/delegation-keys"]
        new = after.workload(component)["spec"]["template"]["metadata"]["annotations"]["checksum/delegation-keys"]
        assert old != new, component
    assert "checksum/delegation-keys" not in after.workload("gateway")["spec"]["template"]["metadata"]["annotations"]
