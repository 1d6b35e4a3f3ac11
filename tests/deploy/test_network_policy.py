"""The NetworkPolicies allow exactly the expected graph: computed from the rendered policies, compared with what the
architecture needs (docs/architecture.md), edge for edge, for every scenario and tenant."""

from __future__ import annotations

import copy

import helm_python
import pytest

from .manifests import SERVICES, TENANTS, Doc, Render, RenderCache, env_of, pod_spec, scenario_values
from .manifests import render as render_chart
from .netpol import Edge, allowed_edges, cidr_peer, default_deny_problems, namespace_peer, port_name

# Ranges that the internet rule must never reach, whatever the values say.
NEVER_REACHABLE = {
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "169.254.169.254/32",
}
CALLS = {"gateway": ("agent", "tool", "integrator"), "agent": ("integrator",), "integrator": ("tool",)}
METERED = ("agent", "tool", "integrator")  # the services with a metrics.port of their own


def _tcp(port: int) -> str:
    return port_name("TCP", port)


def _name_selector(namespace: str) -> Doc:
    return {"matchLabels": {"kubernetes.io/metadata.name": namespace}}


def expected_edges(render: Render) -> set[Edge]:
    """The connections the platform needs, and no others."""
    v = render.values
    net = v["networkPolicy"]
    ports = {c: v[c]["port"] for c in ("agent", "tool", "integrator")}
    edges: set[Edge] = set()

    ingress_pods = {"matchLabels": net["ingress"]["podLabels"]} if net["ingress"]["podLabels"] else None
    sources = [namespace_peer(_name_selector(net["ingress"]["namespace"]), ingress_pods)]
    sources += [cidr_peer(c) for c in net["ingress"]["cidrs"]]
    edges |= {(s, "gateway", _tcp(v["gateway"][p])) for s in sources for p in ("httpPort", "grpcPort")}

    edges |= {(src, dst, _tcp(ports[dst])) for src, dsts in CALLS.items() for dst in dsts}

    dns_pods = {"matchLabels": net["dns"]["podLabels"]} if net["dns"]["podLabels"] else None
    dns = namespace_peer(_name_selector(net["dns"]["namespace"]), dns_pods)
    edges |= {(c, dns, port_name(proto, 53)) for c in SERVICES for proto in ("UDP", "TCP")}

    if v["redis"]["url"] or v["redis"]["urlInExistingSecret"]:
        redis = [cidr_peer(c) for c in v["redis"]["cidrs"]]
        users = ["agent", "tool", "integrator"]
        if v["gateway"]["tenantRateLimit"]["requestsPerSecond"] > 0:
            users.append("gateway")  # the tenants' request-rate buckets, shared by its replicas
        edges |= {(c, r, _tcp(v["redis"]["port"])) for c in users for r in redis}

    internet = cidr_peer("0.0.0.0/0", net["internet"]["except"])
    cloud_tasks = v["agent"]["workQueue"]["type"] == "cloud-tasks"
    callers = {"tool", "integrator"} | ({"gateway", "agent"} if v["config"]["jwt"]["jwksUrl"] else set())
    callers |= {"agent"} if cloud_tasks else set()  # the Cloud Tasks API and Google's JWKS
    edges |= {(c, internet, _tcp(net["internet"]["port"])) for c in callers}

    if v["tool"]["discovery"]["enabled"]:
        api = net["kubeApiServer"]
        edges |= {("tool", cidr_peer(c), _tcp(p)) for c in api["cidrs"] for p in api["ports"]}

    # Tool containers: reached by the tool service alone; they reach the DNS, and the internet if they say so.
    for tc in v["toolContainers"]:
        container = f"tool-{tc['name']}"
        edges |= {("tool", container, _tcp(tc["port"]))}
        edges |= {(container, dns, port_name(proto, 53)) for proto in ("UDP", "TCP")}
        if tc.get("egressInternet"):
            edges |= {(container, internet, _tcp(net["internet"]["port"]))}

    for rule in v["integrator"]["llmEgress"]:
        peers = [cidr_peer(rule["cidr"])] if "cidr" in rule else [_peer_name(p) for p in rule["to"]]
        edges |= {("integrator", p, _tcp(port)) for p in peers for port in rule["ports"]}

    if "gcp" in (v["integrator"]["secretBackend"], v["integrator"]["auditSink"]["type"]):
        # Workload Identity's tokens come from the GKE metadata server (Google's APIs are on the internet rule).
        edges |= {("integrator", cidr_peer("169.254.169.254/32"), _tcp(80))}
        edges |= {("integrator", cidr_peer("169.254.169.252/32"), _tcp(988))}

    if cloud_tasks:
        # The agent creates tasks as its Workload Identity; Cloud Tasks pushes them through the load balancer.
        edges |= {("agent", cidr_peer("169.254.169.254/32"), _tcp(80))}
        edges |= {("agent", cidr_peer("169.254.169.252/32"), _tcp(988))}
        ct = v["agent"]["workQueue"]["cloudTasks"]
        edges |= {(_peer_name(peer), "agent", _tcp(ct["pushPort"])) for peer in ct["pushFrom"]}

    scrapers = [_peer_name(peer) for peer in net["metrics"]["from"]]
    for component in METERED:
        metrics_port = v[component]["metrics"].get("port")
        if metrics_port:
            edges |= {(s, component, _tcp(metrics_port)) for s in scrapers}
    # The gateway's /metrics is on its REST port.
    edges |= {(s, "gateway", _tcp(v["gateway"]["httpPort"])) for s in scrapers}

    otlp = v["telemetry"]["otlp"]
    if otlp["endpoint"]:
        # Every service exports its spans to the collector (the tool containers do not trace).
        for rule in otlp["egress"]:
            peers = [cidr_peer(rule["cidr"])] if "cidr" in rule else [_peer_name(p) for p in rule["to"]]
            edges |= {(c, p, _tcp(port)) for c in SERVICES for p in peers for port in rule["ports"]}

    if v["mesh"]["istio"]["enabled"]:
        # Every sidecar (the tool containers' too) reaches istiod for its certificates and configuration.
        istio = v["mesh"]["istio"]
        istiod = namespace_peer(_name_selector(istio["istiodNamespace"]), {"matchLabels": istio["istiodLabels"]})
        pods = [*SERVICES, *(f"tool-{tc['name']}" for tc in v["toolContainers"])]
        edges |= {(c, istiod, _tcp(15012)) for c in pods}
    return edges


def _peer_name(peer: Doc) -> str:
    """The name netpol gives what a NetworkPolicy peer from the values admits outside the namespace."""
    if "ipBlock" in peer:
        return cidr_peer(peer["ipBlock"]["cidr"], peer["ipBlock"].get("except", ()))
    assert "namespaceSelector" in peer, f"the scenarios name peers outside the namespace: {peer}"
    return namespace_peer(peer["namespaceSelector"], peer.get("podSelector"))


def _diff(actual: set[Edge], expected: set[Edge]) -> dict[str, list[Edge]]:
    return {"unexpected": sorted(actual - expected), "missing": sorted(expected - actual)}


def test_policies_allow_exactly_the_expected_graph(rendered: Render) -> None:
    actual = allowed_edges(rendered.docs, rendered.namespace)
    expected = expected_edges(rendered)
    assert len(expected) >= 15
    assert _diff(actual, expected) == {"unexpected": [], "missing": []}


def test_every_pod_is_under_the_default_deny(rendered: Render) -> None:
    assert default_deny_problems(rendered.docs, rendered.namespace) == []
    # and so no pod is open in either direction
    open_edges = {e for e in allowed_edges(rendered.docs, rendered.namespace) if "*" in e[:2]}
    assert open_edges == set()


def test_internet_rule_excludes_private_and_metadata_ranges(rendered: Render) -> None:
    blocks = [
        peer["ipBlock"]
        for np in rendered.of_kind("NetworkPolicy")
        for rule in np["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if "ipBlock" in peer and peer["ipBlock"]["cidr"] == "0.0.0.0/0"
    ]
    assert blocks, "no internet egress rule rendered"
    for block in blocks:
        assert NEVER_REACHABLE <= set(block.get("except", [])), block
    ports = {
        p["port"]
        for np in rendered.of_kind("NetworkPolicy")
        for rule in np["spec"].get("egress", [])
        if any(peer.get("ipBlock", {}).get("cidr") == "0.0.0.0/0" for peer in rule.get("to", []))
        for p in rule["ports"]
    }
    assert ports == {443}


def test_every_configured_address_is_reachable(rendered: Render) -> None:
    """The ALTAN_*_ADDR a service is given (what it will dial) is an allowed edge of the graph."""
    edges = allowed_edges(rendered.docs, rendered.namespace)
    needed = 0
    for component in SERVICES:
        env = env_of(pod_spec(rendered.workload(component))["containers"][0])
        for key, var in env.items():
            if key.endswith("_ADDR"):
                target = key.removeprefix("ALTAN_").removesuffix("_ADDR").lower()
                port = var["value"].rsplit(":", 1)[1]
                assert (component, target, f"TCP/{port}") in edges, (component, key)
                needed += 1
    assert needed == 5


@pytest.mark.parametrize("component", METERED)
def test_the_metrics_port_is_reachable_only_from_the_named_peers(rendered: Render, component: str) -> None:
    port = rendered.values[component]["metrics"].get("port")
    (container,) = pod_spec(rendered.workload(component))["containers"]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared.get("metrics") == port
    env = env_of(container)
    assert env.get(f"ALTAN_{component.upper()}_METRICS_PORT", {}).get("value") == (str(port) if port else None)
    if not port:
        return
    edges = allowed_edges(rendered.docs, rendered.namespace)
    scrapers = {e[0] for e in edges if e[1:] == (component, _tcp(port))}
    assert scrapers == {_peer_name(p) for p in rendered.values["networkPolicy"]["metrics"]["from"]}
    assert not {s for s in scrapers if s == "*" or s.startswith(("ns(*)/pods(*)", "cidr(0.0.0.0/0"))}
    # no rule of the component's policy leaves the port open (a rule without "from", or without ports)
    policy = _policy(rendered.docs, f"-{component}")
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), rule


@pytest.mark.parametrize("component", METERED)
def test_some_scenarios_serve_metrics_with_and_without_scrapers(renders: RenderCache, component: str) -> None:
    """So that the check above sees, for each service, a port that some peers may reach, and one that nothing may."""
    seen = set()
    for each in renders.all():
        if each.values[component]["metrics"].get("port"):
            seen.add(bool(each.values["networkPolicy"]["metrics"]["from"]))
    assert seen == {True, False}


def test_the_otlp_egress_is_every_services_and_only_to_the_collector(
    rendered: Render, chart: helm_python.Chart
) -> None:
    """telemetry.otlp.egress adds edges from the four services only, to the named collector and ports (vs. without)."""
    otlp = rendered.values["telemetry"]["otlp"]
    if not (otlp["endpoint"] and otlp["egress"]):
        return
    values = scenario_values(rendered.scenario)
    values["telemetry"]["otlp"]["endpoint"] = ""
    without = render_chart(chart, values, release=rendered.release, namespace=rendered.namespace)
    added = allowed_edges(rendered.docs, rendered.namespace) - allowed_edges(without.docs, without.namespace)
    assert {e[0] for e in added} == set(SERVICES)
    assert {e[2] for e in added} == {_tcp(p) for rule in otlp["egress"] for p in rule["ports"]}
    assert not {e for e in added if e[1] == "*" or e[1].startswith(("ns(*)/pods(*)", "cidr(0.0.0.0/0"))}
    for component in SERVICES:
        env = env_of(pod_spec(rendered.workload(component))["containers"][0])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == otlp["endpoint"], component
        no_env = env_of(pod_spec(without.workload(component))["containers"][0])
        assert not {k for k in no_env if k.startswith("OTEL_")}, component


def test_some_scenarios_export_traces_by_selector_by_cidr_and_to_a_sidecar(renders: RenderCache) -> None:
    """So that the checks above see each shape of telemetry.otlp.egress, and an endpoint that needs none."""
    seen = set()
    for each in renders.all():
        otlp = each.values["telemetry"]["otlp"]
        if otlp["endpoint"]:
            seen |= {"cidr" if "cidr" in rule else "to" for rule in otlp["egress"]} or {"sidecar"}
    assert seen == {"cidr", "to", "sidecar"}


def test_llm_egress_adds_only_the_integrators_rules(rendered: Render, chart: helm_python.Chart) -> None:
    """integrator.llmEgress adds edges from the integrator only, to the named endpoints and ports (vs. without it)."""
    llm = rendered.values["integrator"]["llmEgress"]
    if not llm:
        return
    values = scenario_values(rendered.scenario)
    values["integrator"]["llmEgress"] = []
    without = render_chart(chart, values, release=rendered.release, namespace=rendered.namespace)
    added = allowed_edges(rendered.docs, rendered.namespace) - allowed_edges(without.docs, without.namespace)
    ports = {_tcp(p) for rule in llm for p in rule["ports"]}
    assert added and {e[0] for e in added} == {"integrator"} and {e[2] for e in added} == ports
    assert not {e for e in added if e[1] == "*" or e[1].startswith(("ns(*)/pods(*)", "cidr(0.0.0.0/0"))}


def test_some_scenarios_reach_llm_endpoints_by_cidr_and_by_selector(renders: RenderCache) -> None:
    kinds = {
        "cidr" if "cidr" in rule else "to" for each in renders.all() for rule in each.values["integrator"]["llmEgress"]
    }
    assert kinds == {"cidr", "to"}


# The checker itself must be able to fail: feed it policies with one change each.


@pytest.fixture
def baseline(renders: RenderCache) -> Render:
    return renders.get("tool-containers", *TENANTS[0])


def _policy(docs: list[Doc], suffix: str) -> Doc:
    return next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith(suffix))


def test_checker_flags_an_extra_allow(baseline: Render) -> None:
    docs = copy.deepcopy(baseline.docs)
    tool = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "tool"}}}
    agent = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "agent"}}}
    port = [{"protocol": "TCP", "port": baseline.values["tool"]["port"]}]
    _policy(docs, "-agent")["spec"]["egress"].append({"to": [tool], "ports": port})
    _policy(docs, "-tool")["spec"]["ingress"].append({"from": [agent], "ports": port})
    diff = _diff(allowed_edges(docs, baseline.namespace), expected_edges(baseline))
    assert diff == {"unexpected": [("agent", "tool", f"TCP/{baseline.values['tool']['port']}")], "missing": []}


def test_checker_needs_both_ends_of_a_connection(baseline: Render) -> None:
    """An egress rule alone (without the destination's ingress) opens nothing inside the namespace."""
    docs = copy.deepcopy(baseline.docs)
    tool = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "tool"}}}
    _policy(docs, "-agent")["spec"]["egress"].append({"to": [tool]})
    assert _diff(allowed_edges(docs, baseline.namespace), expected_edges(baseline)) == {"unexpected": [], "missing": []}


def test_checker_flags_a_missing_default_deny(baseline: Render) -> None:
    docs = [d for d in copy.deepcopy(baseline.docs) if not d["metadata"]["name"].endswith("-default-deny")]
    assert default_deny_problems(docs, baseline.namespace)
    # A pod that no remaining policy restricts in a direction is open in that direction.
    _policy(docs, "-tool-ocr")["spec"]["policyTypes"] = ["Ingress"]
    diff = _diff(allowed_edges(docs, baseline.namespace), expected_edges(baseline))
    assert diff["unexpected"] == [("tool-ocr", "*", "*")]
    # (its own egress rules no longer count: "*" stands for them)
    assert diff["missing"] and {e[0] for e in diff["missing"]} == {"tool-ocr"}


def test_checker_flags_a_widened_internet_rule(baseline: Render) -> None:
    docs = copy.deepcopy(baseline.docs)
    for rule in _policy(docs, "-integrator")["spec"]["egress"]:
        for peer in rule["to"]:
            if peer.get("ipBlock", {}).get("cidr") == "0.0.0.0/0":
                peer["ipBlock"]["except"].remove("169.254.169.254/32")
                peer["ipBlock"]["except"].remove("169.254.0.0/16")
    diff = _diff(allowed_edges(docs, baseline.namespace), expected_edges(baseline))
    assert len(diff["unexpected"]) == 1 and diff["unexpected"][0][0] == "integrator"
    assert len(diff["missing"]) == 1 and diff["missing"][0][0] == "integrator"


@pytest.mark.parametrize(
    ("scenario", "component"), [("tenant-a", "integrator"), ("monitoring-tls", "agent"), ("monitoring-tls", "tool")]
)
def test_checker_flags_a_metrics_port_open_to_all(renders: RenderCache, scenario: str, component: str) -> None:
    render = renders.get(scenario, *TENANTS[0])
    port = render.values[component]["metrics"]["port"]
    docs = copy.deepcopy(render.docs)
    (rule,) = [r for r in _policy(docs, f"-{component}")["spec"]["ingress"] if r["ports"][0]["port"] == port]
    del rule["from"]
    diff = _diff(allowed_edges(docs, render.namespace), expected_edges(render))
    assert (("*", component, f"TCP/{port}")) in diff["unexpected"]


def test_checker_flags_a_missing_metrics_rule(renders: RenderCache) -> None:
    """The expected graph wants the agent's metrics port reachable by the scrapers: dropping the rule is seen."""
    render = renders.get("monitoring-tls", *TENANTS[0])
    port = render.values["agent"]["metrics"]["port"]
    docs = copy.deepcopy(render.docs)
    policy = _policy(docs, "-agent")
    policy["spec"]["ingress"] = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] != port]
    diff = _diff(allowed_edges(docs, render.namespace), expected_edges(render))
    assert diff["unexpected"] == [] and {e[1:] for e in diff["missing"]} == {("agent", f"TCP/{port}")}


def test_checker_flags_llm_egress_to_every_port(renders: RenderCache) -> None:
    render = renders.get("tenant-b", *TENANTS[0])
    docs = copy.deepcopy(render.docs)
    (rule,) = [r for r in _policy(docs, "-integrator")["spec"]["egress"] if r["ports"][0]["port"] == 11434]
    del rule["ports"]
    diff = _diff(allowed_edges(docs, render.namespace), expected_edges(render))
    endpoint = ("integrator", "cidr(10.70.0.8/32)")
    assert diff == {"unexpected": [(*endpoint, "*")], "missing": [(*endpoint, "TCP/11434")]}


def test_checker_flags_any_namespace_ingress(baseline: Render) -> None:
    docs = copy.deepcopy(baseline.docs)
    _policy(docs, "-agent")["spec"]["ingress"].append({"from": [{"namespaceSelector": {}}]})
    diff = _diff(allowed_edges(docs, baseline.namespace), expected_edges(baseline))
    assert diff == {"unexpected": [("ns(*)/pods(*)", "agent", "*")], "missing": []}
