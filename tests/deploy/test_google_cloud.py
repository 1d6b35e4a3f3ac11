"""Google Cloud in the chart: the integrator's secret backend and audit sink reach its Settings (and no other
service's), the schema refuses what the services would, and Workload Identity's metadata server is reachable exactly
when a Google backend is on."""

from __future__ import annotations

import re

import helm_python
import pytest

from .environment import service_settings
from .manifests import SCENARIOS, SERVICES, Render, pod_spec, scenario_values


def _uses_google(values: dict[str, object]) -> bool:
    integrator = values["integrator"]
    assert isinstance(integrator, dict)
    return "gcp" in (integrator["secretBackend"], integrator["auditSink"]["type"])


def test_the_integrator_gets_its_secret_backend_and_audit_sink(
    rendered: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = rendered.values["integrator"]
    for component in SERVICES:
        environment, settings = service_settings(rendered, component, monkeypatch)
        if component != "integrator":
            assert (settings.secret_backend, settings.audit_sink, settings.gcp_project) == ("local", "none", None)
            assert not {k for k in environment if "GCP" in k or k in ("ALTAN_SECRET_BACKEND", "ALTAN_AUDIT_SINK")}
            continue
        assert (settings.secret_backend, settings.audit_sink) == (v["secretBackend"], v["auditSink"]["type"])
        if _uses_google(rendered.values):
            assert settings.gcp_project == v["gcp"]["project"]
            assert settings.gcp_secret_prefix == v["gcp"]["secretPrefix"]
            assert settings.gcp_audit_log_name == v["auditSink"]["logName"]
        assert settings.gcp_emulator_host is None, "the chart never points at an emulator"


def test_workload_identity_annotates_the_integrators_service_account(rendered: Render) -> None:
    wanted = rendered.values["integrator"]["serviceAccount"]["gcpServiceAccount"]
    name = pod_spec(rendered.workload("integrator"))["serviceAccountName"]
    account = rendered.get("ServiceAccount", name)
    assert account is not None
    annotations = account["metadata"].get("annotations") or {}
    assert annotations.get("iam.gke.io/gcp-service-account", "") == wanted


def test_some_scenarios_use_google_and_some_do_not() -> None:
    given = [scenario_values(s).get("integrator", {}) for s in SCENARIOS]
    google = [i for i in given if i.get("secretBackend") == "gcp"]
    assert google and any(i.get("auditSink", {}).get("type") == "gcp" for i in google)
    assert all(i["serviceAccount"]["gcpServiceAccount"] for i in google), "Workload Identity with Google backends"
    assert any(i.get("secretBackend", "local") == "local" for i in given)


@pytest.mark.parametrize(
    ("integrator", "where"),
    [
        ({"secretBackend": "gcp"}, "/integrator"),  # no project
        ({"auditSink": {"type": "gcp", "logName": "altan-audit"}}, "/integrator"),
        ({"secretBackend": "vault"}, "/integrator/secretBackend"),
        ({"gcp": {"project": "Acme_Prod", "secretPrefix": "altan"}}, "/integrator/gcp/project"),
        ({"gcp": {"project": "acme-prod", "secretPrefix": "altan/prod"}}, "/integrator/gcp/secretPrefix"),
        ({"auditSink": {"type": "none", "logName": "audit log"}}, "/integrator/auditSink/logName"),
        ({"gcp": {"project": "acme-prod", "secretPrefix": "altan", "region": "eu"}}, "/integrator/gcp"),
    ],
)
def test_the_schema_refuses_what_the_integrator_would(
    chart: helm_python.Chart, integrator: dict[str, object], where: str
) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(f"at '{where}")):
        chart.validate_schema(scenario_values("default") | {"integrator": integrator})
