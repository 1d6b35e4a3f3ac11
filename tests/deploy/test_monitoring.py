"""The chart's monitoring: every alert and dashboard query is PromQL that parses (promql-parser, the Rust parser
GreptimeDB uses), reads only metrics the services register or docs/operations.md names as assumed, and is scoped to
the install's namespace; ServiceMonitor and PodMonitoring scrape the ports that serve /metrics; the mTLS identities and
Istio's principals admit exactly the callers the NetworkPolicies admit."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
import yaml

from .manifests import CHART, REPO, SERVICES, TENANTS, Doc, Render, RenderCache, env_of, pod_spec
from .manifests import render as render_chart
from .netpol import allowed_edges

DASHBOARD = CHART / "dashboards" / "altan.json"
OPERATIONS = REPO / "docs" / "operations.md"
_REGISTERED = re.compile(r"\b(Counter|Histogram|Gauge|Summary)\(\s*\"(altan_[a-z0-9_]+)\"", re.MULTILINE)
_SUFFIXES = {"Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count"), "Gauge": ("",), "Summary": ("_sum",)}


def registered_metrics() -> set[str]:
    """The series the services' prometheus_client metrics expose today (their names with the exposition suffixes)."""
    names = set()
    for path in [*(REPO / "services").rglob("*.py"), *(REPO / "libs").rglob("*.py")]:
        for kind, name in _REGISTERED.findall(path.read_text()):
            base = name.removesuffix("_total") if kind == "Counter" else name
            names |= {base + suffix for suffix in _SUFFIXES[kind]}
    return names


_ROW = re.compile(r"^\| (counter|histogram|gauge) \| `(altan_[a-z0-9_]+)` \|.*\| ([^|]*) \|$", re.MULTILINE)


def documented_metrics(text: str | None = None) -> dict[str, bool]:
    """The series docs/operations.md lists as read by the alerts and dashboard -> whether it marks them registered."""
    text = OPERATIONS.read_text() if text is None else text
    section = text.split("### Metrics the alerts read", 1)[1].split("\n#", 1)[0]
    names = {}
    for kind, name, served_by in _ROW.findall(section):
        for suffix in ("_bucket", "_sum", "_count") if kind == "histogram" else ("",):
            names[name + suffix] = "registered" in served_by
    return names


def assumed_metrics() -> set[str]:
    """The metrics the docs list as read by the alerts before the services register them (not marked registered)."""
    return {name for name, registered in documented_metrics().items() if not registered}


KNOWN = registered_metrics() | assumed_metrics() | {"up"}


def _marking_problems(documented: dict[str, bool], registered: set[str]) -> list[str]:
    problems = [
        f"{n} is marked registered in docs/operations.md, but no service registers it"
        for n, r in documented.items()
        if r and n not in registered
    ]
    problems += [
        f"{n} is registered now: mark it so in docs/operations.md"
        for n, r in documented.items()
        if not r and n in registered
    ]
    return problems


def _selectors(expr: promql_parser.Expr) -> Iterator[Any]:
    found: list[Any] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(expr, visit)
    yield from found


def _check_promql(expr: str, namespace: str | None) -> list[str]:
    try:
        parsed = promql_parser.parse(expr)
    except ValueError as exc:
        return [f"{expr!r} does not parse: {exc}"]
    problems = []
    selectors = list(_selectors(parsed))
    if not selectors:
        problems.append(f"{expr!r} reads no series")
    for selector in selectors:
        if selector.name not in KNOWN:
            problems.append(f"{selector.name} is neither registered by a service nor listed in docs/operations.md")
        matchers = {(m.name, str(m.op), m.value) for m in selector.matchers.matchers}
        if namespace is not None and ("namespace", str(promql_parser.MatchOp.Equal), namespace) not in matchers:
            problems.append(f"{selector.name} in {expr!r} is not scoped to namespace {namespace}")
    return problems


def test_the_metric_lists_are_not_empty() -> None:
    """The checks below compare against these lists: they must hold what the code and the docs say."""
    assert {"altan_http_requests_total", "altan_llm_calls_total", "altan_llm_call_duration_seconds_bucket"} <= KNOWN
    documented = documented_metrics()
    assert {"altan_task_queue_depth", "altan_grpc_server_handling_seconds_bucket", "altan_auth_failures_total"} <= set(
        documented
    )
    assert len(documented) >= 20


def test_the_docs_mark_registered_exactly_the_metrics_the_code_registers() -> None:
    """A metric marked registered that the code lost, or one still listed as assumed that the code now has, is seen:
    otherwise the list of assumed metrics would let an alert on a metric nobody serves pass for ever."""
    assert _marking_problems(documented_metrics(), registered_metrics()) == []


def test_the_marking_check_bites() -> None:
    table = """### Metrics the alerts read

| kind | metric | labels | served by |
| --- | --- | --- | --- |
| counter | `altan_made_up_total` | `x` | agent, registered |
| gauge | `altan_task_queue_depth` | (none) | agent |
| histogram | `altan_later_seconds` | (none) | tool |
"""
    documented = documented_metrics(table)
    assert documented == {
        "altan_made_up_total": True,
        "altan_task_queue_depth": False,
        "altan_later_seconds_bucket": False,
        "altan_later_seconds_sum": False,
        "altan_later_seconds_count": False,
    }
    assert _marking_problems(documented, registered_metrics()) == [
        "altan_made_up_total is marked registered in docs/operations.md, but no service registers it",
        "altan_task_queue_depth is registered now: mark it so in docs/operations.md",
    ]


def test_the_checker_refuses_what_it_should() -> None:
    assert _check_promql('rate(altan_http_requests_total{namespace="a"}[5m])', "a") == []
    assert _check_promql("sum(rate(altan_http_requests_total[5m])", None)  # unbalanced
    assert _check_promql('rate(altan_http_requests_totl{namespace="a"}[5m])', "a")  # misspelt metric
    assert _check_promql("rate(altan_http_requests_total[5m])", "a")  # every tenant's series
    assert _check_promql("vector(1)", None)  # reads nothing


@pytest.fixture(scope="module")
def monitored(renders: RenderCache) -> list[Render]:
    found = [r for r in renders.all() if r.of_kind("PrometheusRule", "Rules")]
    assert {r.scenario for r in found} >= {"monitoring-tls", "gke-istio"}
    return found


def _rules(render: Render) -> list[tuple[str, Doc]]:
    return [
        (f"{doc['kind']}/{group['name']}", rule)
        for doc in render.of_kind("PrometheusRule", "Rules")
        for group in doc["spec"]["groups"]
        for rule in group["rules"]
    ]


def test_every_alert_is_promql_on_known_metrics_of_its_own_install(monitored: list[Render]) -> None:
    for render in monitored:
        rules = _rules(render)
        alerts = {rule["alert"] for _, rule in rules}
        assert {
            "AltanGrpcErrorRate",
            "AltanGrpcLatencyP99",
            "AltanToolCallSpike",
            "AltanLlmCallSpike",
            "AltanEgressRefusalSpike",
            "AltanAuthFailureSpike",
            "AltanTaskQueueBacklog",
            "AltanCredentialNeedsReauth",
        } <= alerts
        for where, rule in rules:
            assert _check_promql(rule["expr"], render.namespace) == [], (render.scenario, where, rule["alert"])
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_thresholds_come_from_the_values(chart: Any) -> None:
    values = yaml.safe_load((CHART / "ci" / "monitoring-tls-values.yaml").read_text())
    values["monitoring"]["prometheusRule"] |= {"queueBacklog": 4321, "errorRatio": 0.125}
    render = render_chart(chart, values, release="altan", namespace="tenant-alpha")
    exprs = {rule["alert"]: rule["expr"] for _, rule in _rules(render)}
    assert exprs["AltanTaskQueueBacklog"].endswith("> 4321")
    assert "> 0.125" in exprs["AltanGrpcErrorRate"]
    assert {"team": "platform", "severity": "warning"}.items() <= next(
        rule["labels"] for _, rule in _rules(render) if rule["alert"] == "AltanTaskQueueBacklog"
    ).items()


def _dashboard_queries(dashboard: Doc) -> list[str]:
    queries = []
    for panel in dashboard["panels"]:
        queries.extend(target["expr"] for target in panel.get("targets", []))
    return queries


def test_the_dashboard_queries_are_promql_on_known_metrics_of_the_chosen_install() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _dashboard_queries(dashboard)
    assert len(queries) >= 12
    for query in queries:
        # Grafana's variables, as Grafana substitutes them.
        concrete = query.replace("$__rate_interval", "1m").replace("$namespace", "tenant-alpha")
        assert _check_promql(concrete, "tenant-alpha") == [], query
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_dashboard_configmap_holds_the_dashboard(renders: RenderCache) -> None:
    render = renders.get("monitoring-tls", *TENANTS[0])
    (configmap,) = [c for c in render.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["altan.json"]) == json.loads(DASHBOARD.read_text())


def _metrics_ports(render: Render) -> dict[str, str]:
    """Component -> name of the container port that serves /metrics."""
    ports = {"gateway": "http"}
    for component in ("agent", "tool", "integrator"):
        (container,) = pod_spec(render.workload(component))["containers"]
        if any(p["name"] == "metrics" for p in container["ports"]):
            ports[component] = "metrics"
    return ports


def test_the_servicemonitor_scrapes_every_metrics_port(renders: RenderCache) -> None:
    render = renders.get("monitoring-tls", *TENANTS[1])
    (monitor,) = render.of_kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [render.namespace]}
    endpoints = {e["port"] for e in monitor["spec"]["endpoints"]}
    selected = [
        s
        for s in render.of_kind("Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    scraped = {
        s["metadata"]["labels"]["app.kubernetes.io/component"]: p["name"]
        for s in selected
        for p in s["spec"]["ports"]
        if p["name"] in endpoints
    }
    assert scraped == _metrics_ports(render) == {"gateway": "http"} | dict.fromkeys(SERVICES[1:], "metrics")


def test_the_podmonitorings_scrape_every_metrics_port(renders: RenderCache) -> None:
    render = renders.get("gke-istio", *TENANTS[0])
    scraped = {}
    for monitor in render.of_kind("PodMonitoring"):
        component = monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        (container,) = pod_spec(render.workload(component))["containers"]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in container["ports"]}
        scraped[component] = endpoint["port"]
    assert scraped == _metrics_ports(render) == {"gateway": "http"} | dict.fromkeys(SERVICES[1:], "metrics")


def test_monitoring_is_off_by_default(renders: RenderCache) -> None:
    render = renders.get("default", *TENANTS[0])
    assert not render.of_kind("ServiceMonitor", "PodMonitoring", "PrometheusRule", "Rules", "Certificate")


def _callers_by_policy(render: Render) -> dict[str, set[str]]:
    """Which of the install's services the NetworkPolicies let reach each internal service's gRPC port."""
    edges = allowed_edges(render.docs, render.namespace)
    return {
        target: {src for src, dst, port in edges if dst == target and port == f"TCP/{render.values[target]['port']}"}
        for target in ("agent", "tool", "integrator")
    }


def _tls_renders(renders: RenderCache) -> Iterator[Render]:
    for scenario in ("monitoring-tls", "tls-issuer"):
        for tenant in TENANTS:
            yield renders.get(scenario, *tenant)


def test_mtls_admits_exactly_the_callers_the_network_policies_admit(renders: RenderCache) -> None:
    for render in _tls_renders(renders):
        identities = {}
        for component in SERVICES:
            certificate = render.get("Certificate", render.workload(component)["metadata"]["name"])
            assert certificate is not None, component
            identities[component] = certificate["spec"]["commonName"]
            assert identities[component] in certificate["spec"]["dnsNames"]
        for target, callers in _callers_by_policy(render).items():
            (container,) = pod_spec(render.workload(target))["containers"]
            allowed = env_of(container)["ALTAN_TLS_ALLOWED_CLIENTS"]["value"].split(",")
            assert sorted(allowed) == sorted(identities[c] for c in callers), (render.scenario, target)
            # and the clients dial the name in the server's certificate
        for component in SERVICES:
            (container,) = pod_spec(render.workload(component))["containers"]
            for name, var in env_of(container).items():
                if name.endswith("_ADDR"):
                    host = var["value"].removeprefix("dns:///").rsplit(":", 1)[0]
                    target = name.removeprefix("ALTAN_").removesuffix("_ADDR").lower()
                    certificate = render.get("Certificate", render.workload(target)["metadata"]["name"])
                    assert certificate is not None and host in certificate["spec"]["dnsNames"]


def test_the_chart_ca_or_the_named_issuer_signs_the_service_certificates(renders: RenderCache) -> None:
    own = renders.get("monitoring-tls", *TENANTS[0])
    issuers = {i["metadata"]["name"]: i for i in own.of_kind("Issuer")}
    ca = own.get("Certificate", "altan-ca")
    assert ca is not None and ca["spec"]["isCA"] and ca["spec"]["privateKey"]["rotationPolicy"] == "Never"
    assert issuers["altan-ca"]["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    assert (
        ca["spec"]["issuerRef"]["name"] in issuers and "selfSigned" in issuers[ca["spec"]["issuerRef"]["name"]]["spec"]
    )
    for certificate in own.of_kind("Certificate"):
        if certificate is not ca:
            assert certificate["spec"]["issuerRef"] == {
                "name": "altan-ca",
                "kind": "Issuer",
                "group": "cert-manager.io",
            }
            assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"])
    named = renders.get("tls-issuer", *TENANTS[0])
    assert not named.of_kind("Issuer")
    refs = {json.dumps(c["spec"]["issuerRef"], sort_keys=True) for c in named.of_kind("Certificate")}
    assert refs == {
        json.dumps({"name": "company-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}, sort_keys=True)
    }


def test_istio_admits_exactly_the_callers_the_network_policies_admit(renders: RenderCache) -> None:
    for tenant in TENANTS:
        render = renders.get("gke-istio", *tenant)
        modes = {
            p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: p["spec"]["mtls"]["mode"]
            for p in render.of_kind("PeerAuthentication")
        }
        assert modes == {"gateway": "PERMISSIVE", "agent": "STRICT", "tool": "STRICT", "integrator": "STRICT"}
        policies = {
            p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: p
            for p in render.of_kind("AuthorizationPolicy")
        }
        assert set(policies) == set(SERVICES)
        for target, callers in _callers_by_policy(render).items():
            rule = policies[target]["spec"]["rules"][0]
            accounts = {pod_spec(render.workload(c))["serviceAccountName"] for c in callers}
            expected = {f"cluster.local/ns/{render.namespace}/sa/{a}" for a in accounts}
            assert set(rule["from"][0]["source"]["principals"]) == expected, target
            assert rule["to"] == [{"operation": {"ports": [str(render.values[target]["port"])]}}]
        assert not render.of_kind("Certificate")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls": {"enabled": True}, "mesh": {"istio": {"enabled": True}}}, "not both"),
        ({"tls": {"enabled": True, "healthPort": 50062}}, "tls.healthPort"),
        ({"monitoring": {"serviceMonitor": {"enabled": True}}}, "networkPolicy.metrics.from"),
        ({"monitoring": {"podMonitoring": {"enabled": True}}}, "networkPolicy.metrics.from"),
    ],
)
def test_monitoring_and_tls_values_that_cannot_work_are_refused(chart: Any, values: Doc, message: str) -> None:
    base = yaml.safe_load((CHART / "ci" / "default-values.yaml").read_text())
    with pytest.raises(Exception, match=re.escape(message)):
        render_chart(chart, base | values, release="altan", namespace="tenant-alpha")
