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
    callers = {"tool", "integrator"} | ({"gateway", "agent"} if v["config"]["jwt"]["jwksUrl"] else set())
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

    scrapers = [_peer_name(peer) for peer in net["metrics"]["from"]]
    metrics_port = v["integrator"]["metrics"].get("port")
    if metrics_port:
        edges |= {(s, "integrator", _tcp(metrics_port)) for s in scrapers}
    # The gateway's /metrics is on its REST port.
    edges |= {(s, "gateway", _tcp(v["gateway"]["httpPort"])) for s in scrapers}

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


def test_the_metrics_port_is_reachable_only_from_the_named_peers(rendered: Render) -> None:
    port = rendered.values["integrator"]["metrics"].get("port")
    (container,) = pod_spec(rendered.workload("integrator"))["containers"]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared.get("metrics") == port
    if not port:
        return
    scrapers = {e[0] for e in allowed_edges(rendered.docs, rendered.namespace) if e[1:] == ("integrator", _tcp(port))}
    assert scrapers == {_peer_name(p) for p in rendered.values["networkPolicy"]["metrics"]["from"]}
    assert not {s for s in scrapers if s == "*" or s.startswith(("ns(*)/pods(*)", "cidr(0.0.0.0/0"))}
    # no rule of the integrator's policy leaves the port open (a rule without "from", or without ports)
    policy = _policy(rendered.docs, "-integrator")
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), rule


def test_some_scenarios_serve_metrics_with_and_without_scrapers(renders: RenderCache) -> None:
    """So that the check above sees a port that some peers may reach, and one that nothing may."""
    seen = set()
    for each in renders.all():
        if each.values["integrator"]["metrics"].get("port"):
            seen.add(bool(each.values["networkPolicy"]["metrics"]["from"]))
    assert seen == {True, False}


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


def test_checker_flags_a_metrics_port_open_to_all(renders: RenderCache) -> None:
    render = renders.get("tenant-a", *TENANTS[0])
    port = render.values["integrator"]["metrics"]["port"]
    docs = copy.deepcopy(render.docs)
    (rule,) = [r for r in _policy(docs, "-integrator")["spec"]["ingress"] if r["ports"][0]["port"] == port]
    del rule["from"]
    diff = _diff(allowed_edges(docs, render.namespace), expected_edges(render))
    assert ("*", "integrator", f"TCP/{port}") in diff["unexpected"]


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
