"""The agent loop's settings in the chart: ``config.llm`` reaches the agent and the integrator through the shared
ConfigMap, with the services' own defaults and bounds."""

from __future__ import annotations

import json
import re

import annotated_types
import pytest
import yaml

from altan.config import Settings

from .environment import service_settings
from .manifests import CHART, SCENARIOS, Render, scenario_values

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
