"""LLM calls in the chart: ``config.llm`` reaches the agent and the integrator through the shared ConfigMap, with the
services' own defaults and bounds; the integrator gets its egress exemptions, the install's keys and the hosts they
are bound to, and nothing else does."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import annotated_types
import helm_python
import pytest
import yaml

from altan.config import Settings
from altan.egress import EgressPolicy
from services.integrator.__main__ import install_keys

from .environment import service_settings
from .manifests import CHART, SCENARIOS, SERVICES, Render, scenario_values

# config.llm key -> the Settings field (ALTAN_<FIELD>) it sets.
LLM_SETTINGS = {
    "deadlineSeconds": "llm_deadline_seconds",
    "retryAttempts": "llm_retry_attempts",
    "maxTurns": "max_llm_turns",
    "maxToolResultChars": "max_tool_result_chars",
    "maxToolCallErrors": "max_tool_call_errors",
    "contextBudgetTokens": "context_budget_tokens",
    "toolConcurrency": "tool_concurrency",
}


def test_llm_settings_reach_the_agent_and_the_integrator(rendered: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = rendered.values["config"]["llm"]
    for component in ("agent", "integrator"):
        environment, settings = service_settings(rendered, component, monkeypatch)
        for key, field in LLM_SETTINGS.items():
            assert getattr(settings, field) == llm[key], (component, key)
            # Plain decimals: Helm reads numbers as floats and would print 2000000 as "2e+06".
            assert re.fullmatch(r"[0-9]+(\.[0-9]+)?", environment[f"ALTAN_{field.upper()}"]), (component, key)


def test_chart_defaults_are_the_services_defaults() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["config"]["llm"]
    assert set(defaults) == set(LLM_SETTINGS)
    for key, field in LLM_SETTINGS.items():
        assert defaults[key] == Settings.model_fields[field].default, key


def test_schema_bounds_are_the_settings_bounds() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]["properties"]["llm"]
    assert set(schema["properties"]) == set(schema["required"]) == set(LLM_SETTINGS)
    for key, field in LLM_SETTINGS.items():
        prop = schema["properties"][key]
        info = Settings.model_fields[field]
        assert prop["type"] == {int: "integer", float: "number"}[info.annotation], key
        wanted: dict[str, object] = {}
        for constraint in info.metadata:
            if isinstance(constraint, annotated_types.Ge):
                wanted["minimum"] = constraint.ge
            elif isinstance(constraint, annotated_types.Gt):
                wanted["exclusiveMinimum"] = constraint.gt
            elif isinstance(constraint, annotated_types.Le):
                wanted["maximum"] = constraint.le
            else:
                pytest.fail(f"{field}: a constraint the schema does not mirror: {constraint!r}")
        assert {k: prop[k] for k in ("minimum", "exclusiveMinimum", "maximum") if k in prop} == wanted, key
        assert len(wanted) == 2, f"{field} is bounded on both sides"


def test_the_scenarios_change_every_llm_setting() -> None:
    """So that the checks above compare values the chart rendered, not only the defaults it shares with Settings."""
    given = [scenario_values(s).get("config", {}).get("llm", {}) for s in SCENARIOS]
    assert {key for llm in given for key in llm} == set(LLM_SETTINGS)
    assert any(value >= 1_000_000 for llm in given for value in llm.values()), "no value Helm would print as 1e+06"
    assert any(isinstance(llm.get("deadlineSeconds"), float) for llm in given), "no fractional deadline"


PROVIDERS = ("openai", "anthropic")


def _default(field: str) -> str:
    return str(Settings.model_fields[field].default)


def test_the_integrator_gets_its_egress_exemptions_and_key_hosts(
    rendered: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = rendered.values
    for component in SERVICES:
        environment, settings = service_settings(rendered, component, monkeypatch)
        # What each service parses at start-up (a bad entry would stop it).
        EgressPolicy.parse(settings.egress_allow)
        own = values[component].get("egressAllow", "") if component in ("tool", "integrator") else ""
        assert settings.egress_allow == own, component
        for provider in PROVIDERS:
            field = f"{provider}_api_hosts"
            hosts = values["integrator"][f"{provider}ApiHosts"] if component == "integrator" else ""
            # Unset when empty, so that the default lives in the service alone.
            assert (f"ALTAN_{field.upper()}" in environment) == bool(hosts), (component, provider)
            assert getattr(settings, field) == (hosts or _default(field)), (component, provider)


def test_install_keys_reach_the_integrator_bound_to_their_hosts(
    rendered: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = rendered.values["secrets"]
    given = {*secrets["bootstrap"], *secrets["bootstrapKeys"]}
    for component in SERVICES:
        environment, settings = service_settings(rendered, component, monkeypatch)
        keys = install_keys(settings)  # what the integrator's __main__ builds
        if component != "integrator":
            assert keys == {}, component
            continue
        assert set(keys) == {p for p in PROVIDERS if f"ALTAN_{p.upper()}_API_KEY" in given}
        for provider, key in keys.items():
            assert key.value == environment[f"ALTAN_{provider.upper()}_API_KEY"]
            hosts = rendered.values["integrator"][f"{provider}ApiHosts"] or _default(f"{provider}_api_hosts")
            assert key.hosts == {h.strip().lower() for h in hosts.split(",")}, provider


def test_the_scenarios_set_every_integrator_llm_value() -> None:
    integrators = [scenario_values(s).get("integrator", {}) for s in SCENARIOS]
    for key in ("egressAllow", "openaiApiHosts", "anthropicApiHosts"):
        assert any(i.get(key) for i in integrators), key
        assert any(not i.get(key) for i in integrators), f"every scenario sets {key}: the default is not rendered"
    secrets = [scenario_values(s).get("secrets", {}) for s in SCENARIOS]
    given = {k for sec in secrets for k in [*sec.get("bootstrap", {}), *sec.get("bootstrapKeys", [])]}
    assert {f"ALTAN_{p.upper()}_API_KEY" for p in PROVIDERS} <= given


# ALTAN_EGRESS_ALLOW as the schema and the services see it: what one accepts, the other does.
EGRESS_ALLOW_ACCEPTED = [
    "",
    "vllm.models.svc.cluster.local:8000",
    "10.70.0.8/32, ollama.internal:11434",
    "[fd00::5]:8000,fd00::/64",
    "10.0.0.7:443",
]
EGRESS_ALLOW_REFUSED = [
    "vllm.models.svc.cluster.local",  # no port
    "http://vllm.models.svc.cluster.local:8000",  # a URL, not host:port
    "fd00::5:8000",  # IPv6 without brackets
    "10.70.0.8/32;10.70.0.9/32",
]


@pytest.mark.parametrize("spec", EGRESS_ALLOW_ACCEPTED)
def test_egress_allow_the_schema_accepts_is_one_the_services_parse(chart: helm_python.Chart, spec: str) -> None:
    values = {"tool": {"egressAllow": spec}, "integrator": {"egressAllow": spec}}
    chart.validate_schema(scenario_values("default") | values)
    EgressPolicy.parse(spec)


@pytest.mark.parametrize("spec", EGRESS_ALLOW_REFUSED)
def test_egress_allow_the_services_refuse_is_refused_by_the_schema(chart: helm_python.Chart, spec: str) -> None:
    with pytest.raises(ValueError):
        EgressPolicy.parse(spec)
    for component in ("tool", "integrator"):
        with pytest.raises(helm_python.HelmError, match=re.escape(f"at '/{component}/egressAllow'")):
            chart.validate_schema(scenario_values("default") | {component: {"egressAllow": spec}})


@pytest.mark.parametrize(
    "hosts",
    ["api.openai.com:443", "https://api.openai.com", "api.openai.com/v1", "api.openai.com;evil.example"],
)
def test_key_hosts_are_host_names_only(chart: helm_python.Chart, hosts: str) -> None:
    """A port or a URL would never equal an endpoint's host name: the key would silently go nowhere."""
    for provider in PROVIDERS:
        with pytest.raises(helm_python.HelmError, match=re.escape(f"at '/integrator/{provider}ApiHosts'")):
            chart.validate_schema(scenario_values("default") | {"integrator": {f"{provider}ApiHosts": hosts}})


def test_the_integrator_serves_metrics_when_a_port_is_set(rendered: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = rendered.values["integrator"]["metrics"]
    for component in SERVICES:
        environment, settings = service_settings(rendered, component, monkeypatch)
        port = metrics.get("port") if component == "integrator" else None
        assert settings.integrator_metrics_port == port, component
        # The models list is rendered with the port only; without it, the service's own list.
        models = ",".join(metrics["models"]) if port else ""
        assert environment.get("ALTAN_METRICS_MODELS", "") == models, component
        assert settings.metrics_models == (models or _default("metrics_models")), component


def test_the_scenarios_serve_metrics_with_a_models_list() -> None:
    given = [scenario_values(s).get("integrator", {}).get("metrics", {}) for s in SCENARIOS]
    assert any(m.get("port") and m.get("models") for m in given)
    assert any(m.get("port") and not m.get("models") for m in given)
    assert any(not m.get("port") for m in given)


def _notes(chart: helm_python.Chart, integrator: Mapping[str, Any], network_policy: Mapping[str, Any]) -> str:
    values = scenario_values("default") | {"integrator": integrator, "networkPolicy": network_policy}
    files = chart.render(values, name="altan", namespace="tenant-notes", is_install=True)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def test_the_notes_say_what_an_in_cluster_model_or_a_scraper_still_lacks(chart: helm_python.Chart) -> None:
    egress_allow = {"egressAllow": "vllm.models.svc.cluster.local:8000"}
    llm_egress = {"llmEgress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}], "ports": [8000]}]}
    scraper = {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}
    lacks_policy, lacks_guard = "integrator.llmEgress is empty", "integrator.egressAllow is empty"
    lacks_scraper = "name your Prometheus in networkPolicy.metrics.from"

    notes = _notes(chart, egress_allow, {})
    assert lacks_policy in notes and lacks_guard not in notes
    notes = _notes(chart, llm_egress, {})
    assert lacks_guard in notes and lacks_policy not in notes
    notes = _notes(chart, egress_allow | llm_egress | {"metrics": {"port": 9464}}, {})
    assert lacks_policy not in notes and lacks_guard not in notes
    assert 'port 9464 (container port "metrics")' in notes and lacks_scraper in notes
    notes = _notes(chart, {"metrics": {"port": 9464}}, {"metrics": scraper})
    assert "port 9464" in notes and lacks_scraper not in notes
    assert "metrics" not in _notes(chart, {}, {})
