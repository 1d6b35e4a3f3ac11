"""What the NetworkPolicies of one namespace actually allow, as a set of edges.

An edge is ``(source, destination, "PROTO/port")``. Pods of the namespace are named by their workload's
``app.kubernetes.io/component`` label; everything outside the namespace is named by the peer that lets it in
(``ns(...)/pods(...)`` or ``cidr(...)``). Between two pods of the namespace a connection needs both the source's
egress and the destination's ingress, and only ports a destination container declares count. A pod selected by
no policy of a direction is open in that direction: that shows up as an edge to or from ``*``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .manifests import Doc, container_ports, pod_labels, pod_spec, selector_matches

Edge = tuple[str, str, str]
ANY = "*"


def _fmt_labels(selector: Doc | None) -> str:
    selector = selector or {}
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        parts.append(f"{expr['key']} {expr['operator']} {','.join(sorted(expr.get('values') or []))}".strip())
    return ",".join(parts) or ANY


def namespace_peer(namespace_selector: Doc | None, pod_selector: Doc | None = None) -> str:
    """The name of pods in other namespaces that a namespaceSelector (+ podSelector) peer admits."""
    return f"ns({_fmt_labels(namespace_selector)})/pods({_fmt_labels(pod_selector)})"


def cidr_peer(cidr: str, except_: Iterable[str] = ()) -> str:
    """The name of the addresses an ipBlock peer admits."""
    excluded = sorted(except_)
    return f"cidr({cidr} except {','.join(excluded)})" if excluded else f"cidr({cidr})"


def port_name(protocol: str, port: int | str) -> str:
    return f"{protocol}/{port}"


@dataclass(frozen=True)
class Pod:
    name: str
    labels: Mapping[str, str]
    ports: Mapping[str, str]  # containerPort name (and number) -> "PROTO/number"

    def resolve(self, spec: Doc) -> set[str]:
        """The declared ports of this pod that a NetworkPolicy port entry admits (no entry: all of them)."""
        protocol = spec.get("protocol", "TCP")
        if "port" not in spec:
            return {p for p in set(self.ports.values()) if p.startswith(f"{protocol}/")}
        wanted = self.ports.get(str(spec["port"]))
        end = spec.get("endPort")
        if end is not None:
            return {
                p
                for p in set(self.ports.values())
                if p.startswith(f"{protocol}/") and int(spec["port"]) <= int(p.split("/")[1]) <= int(end)
            }
        return {wanted} if wanted and wanted.startswith(f"{protocol}/") else set()


def pods_of(docs: Iterable[Doc]) -> list[Pod]:
    pods = []
    for doc in docs:
        if doc.get("kind") not in {"Deployment", "StatefulSet", "DaemonSet"}:
            continue
        labels = pod_labels(doc)
        ports: dict[str, str] = {}
        for p in container_ports(pod_spec(doc)):
            value = port_name(p.get("protocol", "TCP"), p["containerPort"])
            ports[str(p["containerPort"])] = value
            if "name" in p:
                ports[p["name"]] = value
        pods.append(Pod(labels.get("app.kubernetes.io/component", doc["metadata"]["name"]), labels, ports))
    return pods


def _external_ports(ports: list[Doc] | None) -> list[str]:
    if not ports:
        return [ANY]
    out = []
    for p in ports:
        proto = p.get("protocol", "TCP")
        port = p.get("port", ANY)
        out.append(port_name(proto, f"{port}-{p['endPort']}" if "endPort" in p else port))
    return out


class _Side:
    """The peers and ports one direction of the policies selecting one pod allows."""

    def __init__(self) -> None:
        self.open = False  # no policy of this direction selects the pod
        self.rules: list[tuple[list[Doc] | None, list[Doc] | None]] = []


def allowed_edges(docs: Iterable[Doc], namespace: str, namespace_labels: Mapping[str, str] | None = None) -> set[Edge]:
    """Every (source, destination, port) the NetworkPolicies in ``docs`` let through, for pods of ``namespace``."""
    docs = list(docs)
    ns_labels = dict(namespace_labels or {"kubernetes.io/metadata.name": namespace})
    pods = pods_of(docs)
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy" and d["metadata"].get("namespace") == namespace]

    sides: dict[tuple[str, str], _Side] = {}
    for pod in pods:
        for direction, key, peers_key in (("Ingress", "ingress", "from"), ("Egress", "egress", "to")):
            side = _Side()
            selecting = [
                np
                for np in policies
                if selector_matches(np["spec"].get("podSelector"), pod.labels)
                and direction in _policy_types(np["spec"])
            ]
            side.open = not selecting
            for np in selecting:
                for rule in np["spec"].get(key) or []:
                    side.rules.append((rule.get(peers_key), rule.get("ports")))
            sides[(pod.name, direction)] = side

    edges: set[Edge] = set()
    for pod in pods:
        ingress, egress = sides[(pod.name, "Ingress")], sides[(pod.name, "Egress")]
        if ingress.open:
            edges.add((ANY, pod.name, ANY))
        if egress.open:
            edges.add((pod.name, ANY, ANY))
        for peers, ports in ingress.rules:
            for peer in _peers(peers):
                name = _outside_peer(peer, ns_labels)
                if name is not None:
                    for port in _external_ports(ports):
                        edges.add((name, pod.name, port))
        for peers, ports in egress.rules:
            for peer in _peers(peers):
                name = _outside_peer(peer, ns_labels)
                if name is not None:
                    for port in _external_ports(ports):
                        edges.add((pod.name, name, port))

    # Pod to pod inside the namespace: the source's egress and the destination's ingress must both allow it.
    for src in pods:
        for dst in pods:
            if src.name == dst.name:
                continue
            out = _inside_ports(sides[(src.name, "Egress")], src=src, dst=dst, ns_labels=ns_labels, peer_is=dst)
            inn = _inside_ports(sides[(dst.name, "Ingress")], src=src, dst=dst, ns_labels=ns_labels, peer_is=src)
            for port in out & inn:
                edges.add((src.name, dst.name, port))
    return edges


def _peers(peers: list[Doc] | None) -> list[Doc | None]:
    """A rule's peers; a missing or empty list admits everyone (None)."""
    return list(peers) if peers else [None]


def _policy_types(spec: Doc) -> list[str]:
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


def _outside_peer(peer: Doc | None, ns_labels: Mapping[str, str]) -> str | None:
    """The name of what a peer admits from outside the namespace, or None if it only admits pods inside it."""
    if peer is None:
        return ANY
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        return cidr_peer(block["cidr"], block.get("except", ()))
    if "namespaceSelector" in peer:
        selector = peer["namespaceSelector"]
        if selector_matches(selector, ns_labels) and (selector.get("matchLabels") or selector.get("matchExpressions")):
            # Exactly this namespace (by its name label): the pods inside are handled by _inside_ports.
            if (selector.get("matchLabels") or {}).get("kubernetes.io/metadata.name") == ns_labels.get(
                "kubernetes.io/metadata.name"
            ):
                return None
        return namespace_peer(selector, peer.get("podSelector"))
    return None  # podSelector alone: pods of this namespace


def _inside_ports(side: _Side, *, src: Pod, dst: Pod, ns_labels: Mapping[str, str], peer_is: Pod) -> set[str]:
    """The destination ports this side (src's egress or dst's ingress) allows between src and dst."""
    every = set(dst.ports.values())
    if side.open:
        return every
    allowed: set[str] = set()
    for peers, ports in side.rules:
        if not any(_peer_admits(peer, peer_is, ns_labels) for peer in _peers(peers)):
            continue
        if not ports:
            allowed |= every
        else:
            for spec in ports:
                allowed |= dst.resolve(spec)
    return allowed


def _peer_admits(peer: Doc | None, pod: Pod, ns_labels: Mapping[str, str]) -> bool:
    if peer is None:
        return True
    if "ipBlock" in peer:
        return False  # pod addresses are private; the chart never names them by CIDR
    if "namespaceSelector" in peer and not selector_matches(peer["namespaceSelector"], ns_labels):
        return False
    return selector_matches(peer.get("podSelector"), pod.labels)


def default_deny_problems(docs: Iterable[Doc], namespace: str) -> list[str]:
    """Why the namespace lacks a policy that selects every pod and denies both directions (empty when it has one)."""
    for np in (d for d in docs if d.get("kind") == "NetworkPolicy"):
        spec = np["spec"]
        if (
            np["metadata"].get("namespace") == namespace
            and not (spec.get("podSelector") or {})
            and set(_policy_types(spec)) == {"Ingress", "Egress"}
            and not spec.get("ingress")
            and not spec.get("egress")
        ):
            return []
    return [f"no default-deny NetworkPolicy (podSelector {{}}, Ingress and Egress, no rules) in {namespace}"]
