"""Our own checks of the rendered chart: what schemas and checkov do not see (selectors, references, least
privilege, the restricted Pod Security Standard field by field, how the services find each other)."""

from __future__ import annotations

import re

from .manifests import (
    SCENARIOS,
    SERVICES,
    Doc,
    Render,
    RenderCache,
    container_ports,
    containers,
    env_of,
    pod_labels,
    pod_spec,
    scenario_values,
    selector_matches,
)

UID = 10001
PSS_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
STATEFUL = ("agent", "tool", "integrator")


def _workloads_selected(render: Render, selector: Doc) -> list[Doc]:
    return [w for w in render.workloads() if selector_matches(selector, pod_labels(w))]


def _redis_enabled(render: Render) -> bool:
    return bool(render.values["redis"]["url"] or render.values["redis"]["urlInExistingSecret"])


def _uses_redis(render: Render, component: str) -> bool:
    """The stateful services, and the gateway when its replicas share the tenants' request-rate buckets."""
    limited = render.values["gateway"]["tenantRateLimit"]["requestsPerSecond"] > 0
    return _redis_enabled(render) and (component in STATEFUL or (component == "gateway" and limited))


def test_selectors_match_pod_labels(rendered: Render) -> None:
    for workload in rendered.workloads():
        selector = workload["spec"]["selector"]
        assert selector.get("matchLabels"), workload["metadata"]["name"]
        assert selector_matches(selector, pod_labels(workload)), workload["metadata"]["name"]
        # No other workload's pods may fall under this selector (a Deployment would fight over them).
        assert _workloads_selected(rendered, selector) == [workload]
    for service in rendered.of_kind("Service"):
        (target,) = _workloads_selected(rendered, {"matchLabels": service["spec"]["selector"]})
        names = {p.get("name") for p in container_ports(pod_spec(target))}
        numbers = {p["containerPort"] for p in container_ports(pod_spec(target))}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names | numbers, (service["metadata"]["name"], port)
    for policy in rendered.of_kind("NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        if selector:
            assert _workloads_selected(rendered, selector), f"{policy['metadata']['name']} selects no pod"


def test_hpas_and_pdbs_target_existing_workloads(rendered: Render) -> None:
    deployments = {d["metadata"]["name"]: d for d in rendered.of_kind("Deployment")}
    scaled = set()
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        assert ref["name"] in deployments, ref
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
        assert resources == {"cpu", "memory"}
        scaled.add(ref["name"])
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        assert len(_workloads_selected(rendered, pdb["spec"]["selector"])) == 1, pdb["metadata"]["name"]

    for component in SERVICES:
        settings = rendered.values[component]
        workload = rendered.workload(component)
        name = workload["metadata"]["name"]
        if settings["autoscaling"]["enabled"]:
            assert name in scaled
            # The HPA owns the replica count; a fixed one would be reset on every upgrade.
            assert "replicas" not in workload["spec"]
        else:
            assert name not in scaled
            assert workload["spec"]["replicas"] == settings["replicas"]
        budgets = [
            p
            for p in rendered.of_kind("PodDisruptionBudget")
            if selector_matches(p["spec"]["selector"], pod_labels(workload))
        ]
        assert len(budgets) == (1 if settings["pdb"]["enabled"] else 0), component


def test_rollouts_surge_one_pod_and_keep_the_rest(rendered: Render) -> None:
    """Rolling updates never take a pod away before its replacement is ready (the tenant quota counts one surge pod)."""
    for deployment in rendered.of_kind("Deployment"):
        assert deployment["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        }, deployment["metadata"]["name"]


def test_agent_scales_on_queue_length_when_configured(rendered: Render) -> None:
    queue = rendered.values["agent"]["autoscaling"]["queueLength"]
    hpas = [h for h in rendered.of_kind("HorizontalPodAutoscaler") if h["metadata"]["name"].endswith("-agent")]
    extra = [m for h in hpas for m in h["spec"]["metrics"] if m["type"] != "Resource"]
    if not queue["enabled"]:
        assert extra == []
        return
    (metric,) = extra
    assert metric["type"] == queue["type"]
    body = metric[queue["type"].lower()]
    assert body["metric"]["name"] == queue["metricName"]
    assert body["target"] == {"type": "AverageValue", "averageValue": str(queue["averageValue"])}


def test_every_pod_is_restricted(rendered: Render) -> None:
    """Pod Security Standards "restricted", plus a read-only root filesystem and resource limits, everywhere."""
    for workload in rendered.workloads():
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod_ctx = spec.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True, name
        assert pod_ctx.get("runAsUser") == UID, name
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert spec.get(host) in (None, False), (name, host)
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= PSS_RESTRICTED_VOLUMES, (name, volume)
        for container in containers(spec):
            where = f"{name}/{container['name']}"
            ctx = container.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("privileged") in (None, False), where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not ctx.get("capabilities", {}).get("add"), where
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) == UID, where
            seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            assert "hostPort" not in str(container.get("ports", [])), where
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), (where, bound)


def test_writable_paths_are_empty_dirs(rendered: Render) -> None:
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], workload["metadata"]["name"]
            for path, mount in mounts.items():
                writable = not mount.get("readOnly", False)
                assert not writable or "emptyDir" in volumes[mount["name"]], (workload["metadata"]["name"], path)
    integrator = pod_spec(rendered.workload("integrator"))
    (container,) = integrator["containers"]
    assert env_of(container)["ALTAN_DATA_DIR"]["value"] == "/var/lib/altan"
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/altan")
    assert "emptyDir" in next(v for v in integrator["volumes"] if v["name"] == data["name"])


def test_redis_ca_is_mounted_where_redis_is_used(rendered: Render) -> None:
    ca = rendered.values["redis"]["caCert"]
    for component in SERVICES:
        (container,) = pod_spec(rendered.workload(component))["containers"]
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        wanted = bool(ca) and _uses_redis(rendered, component)
        assert ("/etc/altan/redis-ca" in mounts) == wanted, component
        if wanted:
            assert mounts["/etc/altan/redis-ca"]["readOnly"] is True
    if ca:
        (configmap,) = [c for c in rendered.of_kind("ConfigMap") if "ca.crt" in c.get("data", {})]
        assert configmap["data"]["ca.crt"] == ca


def test_no_latest_tags(rendered: Render) -> None:
    images = [c["image"] for w in rendered.workloads() for c in containers(pod_spec(w))]
    assert images
    for image in images:
        last = image.rsplit("/", 1)[-1]
        assert "@sha256:" in last or ":" in last, f"{image} has no tag"
        if "@" not in last:
            assert last.rsplit(":", 1)[1].lower() != "latest", image


def _secret_refs(container: Doc) -> list[tuple[str, str | None, bool]]:
    """(secret name, key or None for all keys, optional) of every Secret a container reads."""
    refs = []
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs.append((ref["name"], ref["key"], bool(ref.get("optional"))))
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            refs.append((source["secretRef"]["name"], None, bool(source["secretRef"].get("optional"))))
    return refs


def test_secret_references_exist_and_are_scoped(rendered: Render) -> None:
    values = rendered.values
    existing = values["secrets"]["existingSecret"]
    existing_internal = values["internalKey"]["existingSecret"]
    documented = {"ALTAN_JWT_SECRET", "ALTAN_MASTER_KEY", "REDIS_URL", *values["secrets"]["bootstrapKeys"]}
    rendered_secrets = {s["metadata"]["name"]: s for s in rendered.of_kind("Secret")}
    internal = {name for name in rendered_secrets if name.endswith("-internal-key")}
    assert len(internal) != bool(existing_internal), "the internal key: rendered once, or an existing Secret"
    assert bool(set(rendered_secrets) - internal) != bool(existing), (
        "either the chart renders the Secret or an existing one is named"
    )

    jwt = bool(values["secrets"]["jwtSecret"] or existing)
    expected_keys = {
        "gateway": ({"ALTAN_JWT_SECRET"} if jwt else set())
        | ({"REDIS_URL"} if _uses_redis(rendered, "gateway") else set()),
        "agent": ({"ALTAN_JWT_SECRET"} if jwt else set()) | ({"REDIS_URL"} if _redis_enabled(rendered) else set()),
    }
    expected_keys["agent"] |= {"ALTAN_INTERNAL_KEY"}  # never the gateway's
    expected_keys["tool"] = expected_keys["agent"]
    expected_keys["integrator"] = (
        expected_keys["agent"]
        | {"ALTAN_MASTER_KEY"}
        | set(values["secrets"]["bootstrap"])
        | set(values["secrets"]["bootstrapKeys"])
    )
    read_by: dict[str, set[str]] = {}
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        component = pod_labels(workload)["app.kubernetes.io/component"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:  # only the service's own certificate, with mTLS; all else by secretKeyRef
                assert values["tls"]["enabled"] and component in SERVICES, f"{component} mounts a Secret"
                certificate = rendered.get("Certificate", workload["metadata"]["name"])
                assert certificate is not None and certificate["spec"]["secretName"] == volume["secret"]["secretName"]
        for pull in spec.get("imagePullSecrets", []):
            assert pull in values["imagePullSecrets"], pull
        for container in containers(spec):
            for name, key, optional in _secret_refs(container):
                assert key is not None, f"{component} reads a whole Secret through envFrom"
                read_by.setdefault(component, set()).add(key)
                if name in rendered_secrets:
                    data = rendered_secrets[name].get("data", {}) | rendered_secrets[name].get("stringData", {})
                    assert optional or key in data, f"{component} reads {name}/{key}, which is not rendered"
                elif key == "ALTAN_INTERNAL_KEY":
                    assert name == existing_internal, f"{component} reads the internal key from {name}"
                    assert not optional, component
                else:
                    assert name == existing, (
                        f"{component} reads Secret {name}, neither rendered nor secrets.existingSecret"
                    )
                    assert key in documented, f"{component} reads {key}, not a documented key of the existing Secret"
    for component in SERVICES:
        assert read_by.get(component, set()) == expected_keys[component], component
    # Tool containers verify their callers' tokens: the HS256 key, where there is one, the internal key (tasks'
    # delegations), and nothing else.
    for tc in values["toolContainers"]:
        wanted = {"ALTAN_INTERNAL_KEY"} | ({"ALTAN_JWT_SECRET"} if jwt else set())
        assert read_by.get(f"tool-{tc['name']}", set()) == wanted, tc["name"]
    assert set(read_by) <= {*SERVICES, *(f"tool-{tc['name']}" for tc in values["toolContainers"])}


def test_configmaps_hold_no_secret(rendered: Render) -> None:
    values = rendered.values
    secret_values = {
        values["secrets"]["jwtSecret"],
        values["secrets"]["masterKey"],
        values["redis"]["url"],
        *values["secrets"]["bootstrap"].values(),
    } - {""}
    configmaps = rendered.of_kind("ConfigMap")
    assert configmaps
    names = {c["metadata"]["name"] for c in configmaps}
    for configmap in configmaps:
        for key, value in (configmap.get("data") or {}).items():
            # (TOKEN as a word: ALTAN_CONTEXT_BUDGET_TOKENS is a count, not a credential)
            assert not re.search(r"SECRET|PASSWORD|(?<![A-Z])TOKEN(?![A-Z])|MASTER_KEY|REDIS_URL|API_KEY", key), key
            assert not any(s in value for s in secret_values), key
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        for container in containers(spec):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in names
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names


def test_tool_discovery_is_off_by_default_and_then_grants_nothing(renders: RenderCache) -> None:
    """Off by default: no Role, no RoleBinding, no token, and no ALTAN_TOOL_DISCOVERY."""
    assert "discovery" not in scenario_values("default").get("tool", {})
    rendered = renders.get("default", "altan", "tenant-alpha")
    assert rendered.values["tool"]["discovery"]["enabled"] is False
    assert rendered.of_kind("Role", "RoleBinding") == []
    assert pod_spec(rendered.workload("tool")).get("automountServiceAccountToken") is False
    # (and no egress to the API server: test_network_policy checks every scenario's exact graph)


def test_some_scenarios_turn_tool_discovery_on() -> None:
    """So that the rules below are proven for an install that does enable it."""
    enabled = [s for s in SCENARIOS if scenario_values(s).get("tool", {}).get("discovery", {}).get("enabled")]
    assert len(enabled) >= 2, enabled


def test_only_the_tool_service_reaches_the_api(rendered: Render) -> None:
    discovery = rendered.values["tool"]["discovery"]["enabled"]
    accounts = {a["metadata"]["name"]: a for a in rendered.of_kind("ServiceAccount")}
    for account in accounts.values():
        assert account.get("automountServiceAccountToken") is False, account["metadata"]["name"]
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        component = pod_labels(workload)["app.kubernetes.io/component"]
        assert spec["serviceAccountName"] in accounts, component
        wants_token = component == "tool" and discovery
        assert spec.get("automountServiceAccountToken") is wants_token, component
    for component in SERVICES:
        account = accounts[pod_spec(rendered.workload(component))["serviceAccountName"]]
        gsa = rendered.values[component]["serviceAccount"]["gcpServiceAccount"]
        assert account["metadata"].get("annotations", {}).get("iam.gke.io/gcp-service-account") == (gsa or None)

    assert rendered.of_kind("ClusterRole", "ClusterRoleBinding") == []
    roles, bindings = rendered.of_kind("Role"), rendered.of_kind("RoleBinding")
    if not discovery:
        assert roles == [] and bindings == []
        return
    (role,), (binding,) = roles, bindings
    rules = sorted(
        (tuple(r["apiGroups"]), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"]))) for r in role["rules"]
    )
    assert rules == [(("",), ("services",), ("list", "watch"))]  # what services/tool/kubernetes_discovery.py does
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    tool_account = pod_spec(rendered.workload("tool"))["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": tool_account, "namespace": rendered.namespace}]


def test_services_find_each_other_by_service_dns(rendered: Render) -> None:
    values = rendered.values
    ports = {
        "agent": values["agent"]["port"],
        "tool": values["tool"]["port"],
        "integrator": values["integrator"]["port"],
    }
    calls = {"gateway": {"agent", "tool", "integrator"}, "agent": {"integrator"}, "tool": set(), "integrator": {"tool"}}
    services = {s["metadata"]["name"]: s for s in rendered.of_kind("Service")}
    for component, targets in calls.items():
        (container,) = pod_spec(rendered.workload(component))["containers"]
        env = env_of(container)
        addrs = {
            k.removeprefix("ALTAN_").removesuffix("_ADDR").lower(): v["value"]
            for k, v in env.items()
            if k.endswith("_ADDR")
        }
        assert set(addrs) == targets, component
        for target, addr in addrs.items():
            # dns:/// makes gRPC resolve every pod of the headless Service and balance across them.
            assert addr.startswith("dns:///"), addr
            host, port = addr.removeprefix("dns:///").rsplit(":", 1)
            name, namespace, suffix = host.split(".", 2)
            assert (namespace, suffix, int(port)) == (rendered.namespace, "svc", ports[target]), addr
            service = services[name]
            assert int(port) in {p["port"] for p in service["spec"]["ports"]}
            assert service["spec"]["selector"]["app.kubernetes.io/component"] == target
            assert service["spec"].get("clusterIP") == "None", f"{name} must be headless for gRPC balancing"
        # The port a service listens on is the one its container declares and its Service forwards to.
        if component != "gateway":
            assert env[f"ALTAN_{component.upper()}_PORT"]["value"] == str(ports[component])
            metrics = values[component].get("metrics", {}).get("port")
            health = values["tls"]["healthPort"] if values["tls"]["enabled"] else None  # plaintext probes, with mTLS
            queue = values[component].get("workQueue", {})
            push = queue["cloudTasks"]["pushPort"] if queue.get("type") == "cloud-tasks" else None
            assert [p["containerPort"] for p in container["ports"]] == [
                ports[component],
                *([push] if push else []),
                *([health] if health else []),
                *([metrics] if metrics else []),
            ]
        assert ("REDIS_URL" in env) == _uses_redis(rendered, component), component
        assert container["envFrom"] == [{"configMapRef": {"name": container["envFrom"][0]["configMapRef"]["name"]}}]

    config = rendered.get(
        "ConfigMap", pod_spec(rendered.workload("agent"))["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    )
    assert config is not None and config["data"]["ALTAN_BIND_HOST"] == "0.0.0.0"
    gateway = env_of(pod_spec(rendered.workload("gateway"))["containers"][0])
    assert gateway["ALTAN_HTTP_HOST"]["value"] == "0.0.0.0"
    assert gateway["ALTAN_HTTP_PORT"]["value"] == str(values["gateway"]["httpPort"])
    assert gateway["ALTAN_GRPC_PORT"]["value"] == str(values["gateway"]["grpcPort"])


def test_probes(rendered: Render) -> None:
    (gateway,) = pod_spec(rendered.workload("gateway"))["containers"]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    http = next(p for p in gateway["ports"] if p["name"] == "http")
    assert http["containerPort"] == rendered.values["gateway"]["httpPort"]
    for component in ("agent", "tool", "integrator"):
        (container,) = pod_spec(rendered.workload(component))["containers"]
        port = rendered.values[component]["port"]
        if rendered.values["tls"]["enabled"]:  # kubelet's gRPC probes present no certificate: the plaintext health port
            port = rendered.values["tls"]["healthPort"]
            assert {"name": "health", "containerPort": port, "protocol": "TCP"} in container["ports"]
            assert env_of(container)["ALTAN_HEALTH_PORT"]["value"] == str(port)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (component, probe)
