"""Values that cannot work stop the install with a message: the schema refuses malformed values, and the fail guards
in _helpers.tpl refuse combinations. The guards are also checked on a copy of the chart without its schema, as with
``helm install --skip-schema-validation``, so that each layer holds on its own."""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest

from .manifests import CHART, scenario_values

NAMESPACE = "tenant-guard"


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with dotted keys set, e.g. _with(v, **{"redis.url": ""})."""
    out = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


@pytest.fixture(scope="module")
def schemaless_chart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[helm_python.Chart]:
    copy_dir = Path(tmp_path_factory.mktemp("chart")) / "altan"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    with helm_python.Chart.load(copy_dir) as chart:
        yield chart


def _tc(name: str, image: str) -> dict[str, Any]:
    resources = {"cpu": "100m", "memory": "64Mi"}
    return {"name": name, "image": image, "port": 8080, "resources": {"requests": resources, "limits": resources}}


BASE = scenario_values("default")
# Tool containers need discovery (and so the API server's address).
DISCOVERY = _with(BASE, **{"tool.discovery.enabled": True, "networkPolicy.kubeApiServer.cidrs": ["10.0.0.1/32"]})
NO_REDIS = _with(
    BASE,
    **{
        "redis.url": "",
        "redis.cidrs": [],
        **{f"{c}.autoscaling.enabled": False for c in ("agent", "tool", "integrator")},
    },
)

# A model server in another namespace, as a NetworkPolicy peer.
_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "models"}},
    "podSelector": {"matchLabels": {"app": "vllm"}},
}

GUARDS = {
    "latest-tag": (_with(BASE, **{"agent.image.tag": "latest"}), 'must not be "latest"'),
    "latest-global-tag": (_with(BASE, **{"image.tag": "Latest"}), 'must not be "latest"'),
    "no-jwt-key": (_with(BASE, **{"secrets.jwtSecret": ""}), "no JWT key configured"),
    "short-jwt-secret": (_with(BASE, **{"secrets.jwtSecret": "x" * 31}), "must be at least 32 bytes"),
    "jwt-secret-and-jwks": (
        _with(BASE, **{"config.jwt.jwksUrl": "https://idp.example.com/jwks.json"}),
        "not both",
    ),
    "no-master-key": (_with(BASE, **{"secrets.masterKey": ""}), "secrets.masterKey is required"),
    "inline-secrets-with-existing-secret": (
        _with(BASE, **{"secrets.existingSecret": "tenant-secrets"}),
        "put ALTAN_JWT_SECRET",
    ),
    "redis-without-cidrs": (_with(BASE, **{"redis.cidrs": []}), "redis.cidrs is empty"),
    "hpa-without-redis": (_with(NO_REDIS, **{"agent.autoscaling.enabled": True}), "agent: without Redis"),
    "replicas-without-redis": (_with(NO_REDIS, **{"integrator.replicas": 3}), "integrator: without Redis"),
    "min-above-max": (
        _with(BASE, **{"gateway.autoscaling.minReplicas": 5, "gateway.autoscaling.maxReplicas": 2}),
        "greater than maxReplicas",
    ),
    "discovery-without-api-server": (
        _with(BASE, **{"tool.discovery.enabled": True}),
        "tool.discovery.enabled needs networkPolicy.kubeApiServer.cidrs",
    ),
    "tool-containers-without-discovery": (
        _with(BASE, toolContainers=[_tc("ocr", "ocr:1.0")]),
        "toolContainers need tool.discovery.enabled",
    ),
    "untagged-tool-container": (
        _with(DISCOVERY, toolContainers=[_tc("ocr", "registry.example.com:5000/tools/ocr")]),
        "has no tag",
    ),
    "latest-tool-container": (
        _with(DISCOVERY, toolContainers=[_tc("ocr", "registry.example.com:5000/tools/ocr:latest")]),
        'must not use the tag "latest"',
    ),
    "metrics-port-is-grpc-port": (
        _with(BASE, **{"integrator.metrics.port": 50063}),
        "integrator.metrics.port (50063) must differ from integrator.port",
    ),
    "agent-metrics-port-is-grpc-port": (
        _with(BASE, **{"agent.metrics.port": 50061}),
        "agent.metrics.port (50061) must differ from agent.port",
    ),
    "tool-metrics-port-is-grpc-port": (
        _with(BASE, **{"tool.metrics.port": 50062}),
        "tool.metrics.port (50062) must differ from tool.port",
    ),
    "otlp-endpoint-without-egress": (
        _with(BASE, **{"telemetry.otlp.endpoint": "http://otel-collector.observability:4317"}),
        "telemetry.otlp.endpoint (http://otel-collector.observability:4317) needs telemetry.otlp.egress",
    ),
    "otlp-egress-without-destination": (
        _with(
            BASE,
            **{
                "telemetry.otlp.endpoint": "http://otel-collector.observability:4317",
                "telemetry.otlp.egress": [{"ports": [4317]}],
            },
        ),
        "telemetry.otlp.egress[0] needs either cidr or to",
    ),
    "otlp-egress-without-ports": (
        _with(
            BASE,
            **{
                "telemetry.otlp.endpoint": "http://otel-collector.observability:4317",
                "telemetry.otlp.egress": [{"to": [_PEER]}],
            },
        ),
        "telemetry.otlp.egress[0] needs ports",
    ),
    "otlp-egress-to-every-namespace": (
        _with(BASE, **{"telemetry.otlp.egress": [{"to": [{"namespaceSelector": {}}], "ports": [4317]}]}),
        "telemetry.otlp.egress[0].to[0] admits every pod of every namespace",
    ),
    "metrics-from-every-namespace": (
        _with(BASE, **{"networkPolicy.metrics.from": [{"namespaceSelector": {}}]}),
        "networkPolicy.metrics.from[0] admits every pod of every namespace",
    ),
    "metrics-from-every-pod-by-empty-selectors": (
        _with(BASE, **{"networkPolicy.metrics.from": [{"namespaceSelector": {"matchLabels": {}}, "podSelector": {}}]}),
        "networkPolicy.metrics.from[0] admits every pod of every namespace",
    ),
    "metrics-from-every-address": (
        _with(
            BASE,
            **{
                "networkPolicy.metrics.from": [{"ipBlock": {"cidr": "10.0.0.1/32"}}, {"ipBlock": {"cidr": "0.0.0.0/0"}}]
            },
        ),
        "networkPolicy.metrics.from[1] admits every address (0.0.0.0/0)",
    ),
    "metrics-from-empty-peer": (
        _with(BASE, **{"networkPolicy.metrics.from": [{}]}),
        "networkPolicy.metrics.from[0] names no ipBlock, namespaceSelector or podSelector",
    ),
    "metrics-from-ipblock-and-selector": (
        _with(BASE, **{"networkPolicy.metrics.from": [{"ipBlock": {"cidr": "10.0.0.1/32"}, "podSelector": {}}]}),
        "networkPolicy.metrics.from[0] combines ipBlock with a selector",
    ),
    "llm-egress-without-destination": (
        _with(BASE, **{"integrator.llmEgress": [{"ports": [8000]}]}),
        "integrator.llmEgress[0] needs either cidr or to",
    ),
    "llm-egress-with-cidr-and-peers": (
        _with(BASE, **{"integrator.llmEgress": [{"cidr": "10.0.0.1/32", "to": [_PEER], "ports": [8000]}]}),
        "integrator.llmEgress[0] needs either cidr or to",
    ),
    "llm-egress-without-ports": (
        _with(BASE, **{"integrator.llmEgress": [{"cidr": "10.0.0.1/32", "ports": [8000]}, {"to": [_PEER]}]}),
        "integrator.llmEgress[1] needs ports",
    ),
    "llm-egress-to-every-address": (
        _with(BASE, **{"integrator.llmEgress": [{"cidr": "0.0.0.0/0", "ports": [8000]}]}),
        "integrator.llmEgress[0].cidr admits every address (0.0.0.0/0)",
    ),
    "llm-egress-to-every-namespace": (
        _with(BASE, **{"integrator.llmEgress": [{"to": [_PEER, {"namespaceSelector": {}}], "ports": [8000]}]}),
        "integrator.llmEgress[0].to[1] admits every pod of every namespace",
    ),
    "duplicate-tool-container": (
        _with(DISCOVERY, toolContainers=[_tc("ocr", "ocr:1.0"), _tc("ocr", "ocr:2.0")]),
        "is used twice",
    ),
}


def test_the_base_values_render(schemaless_chart: helm_python.Chart, chart: helm_python.Chart) -> None:
    """Each guard case below changes one thing in values that render fine with and without the schema."""
    for loaded in (chart, schemaless_chart):
        assert loaded.render(BASE, name="altan", namespace=NAMESPACE)
        assert loaded.render(NO_REDIS, name="altan", namespace=NAMESPACE)


@pytest.mark.parametrize(("values", "message"), list(GUARDS.values()), ids=list(GUARDS))
def test_fail_guard_stops_the_install(
    schemaless_chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        schemaless_chart.render(values, name="altan", namespace=NAMESPACE)


@pytest.mark.parametrize(("values", "message"), list(GUARDS.values()), ids=list(GUARDS))
def test_the_real_chart_refuses_them_too(chart: helm_python.Chart, values: dict[str, Any], message: str) -> None:
    """With the schema in place the same values fail, by the schema or by the guard."""
    with pytest.raises((helm_python.HelmRenderError, helm_python.HelmValuesError)):
        chart.render(values, name="altan", namespace=NAMESPACE)


SCHEMA_REFUSES = {
    "unknown-key": (_with(BASE, **{"gateway.replica": 2}), "/gateway"),
    "bad-master-key": (_with(BASE, **{"secrets.masterKey": "not-base64-of-32-bytes"}), "/secrets/masterKey"),
    "short-jwt-secret": (_with(BASE, **{"secrets.jwtSecret": "x" * 31}), "/secrets/jwtSecret"),
    "bad-cidr": (_with(BASE, **{"redis.cidrs": ["10.0.0.300"]}), "/redis/cidrs/0"),
    "bootstrap-overrides-master-key": (
        _with(BASE, **{"secrets.bootstrap": {"ALTAN_MASTER_KEY": "x"}}),
        "': invalid propertyName 'ALTAN_MASTER_KEY",
    ),
    "plain-http-jwks-url": (
        _with(BASE, **{"secrets.jwtSecret": "", "config.jwt.jwksUrl": "http://idp.example.com/jwks"}),
        "/config/jwt/jwksUrl",
    ),
    "llm-turns-zero": (_with(BASE, **{"config.llm.maxTurns": 0}), "/config/llm/maxTurns"),
    "llm-deadline-zero": (_with(BASE, **{"config.llm.deadlineSeconds": 0}), "/config/llm/deadlineSeconds"),
    "llm-unknown-key": (_with(BASE, **{"config.llm.maxTurn": 5}), "/config/llm"),
    "metrics-port-as-string": (_with(BASE, **{"integrator.metrics.port": "9464"}), "/integrator/metrics/port"),
    "agent-metrics-port-as-string": (_with(BASE, **{"agent.metrics.port": "9464"}), "/agent/metrics/port"),
    "tool-metrics-unknown-key": (_with(BASE, **{"tool.metrics.models": ["gpt-4o"]}), "/tool/metrics"),
    "otlp-protocol-unknown": (_with(BASE, **{"telemetry.otlp.protocol": "http/json"}), "/telemetry/otlp/protocol"),
    "otlp-endpoint-without-scheme": (
        _with(BASE, **{"telemetry.otlp.endpoint": "otel-collector:4317"}),
        "/telemetry/otlp/endpoint",
    ),
    "sampler-not-parent-based": (_with(BASE, **{"telemetry.sampler": "traceidratio"}), "/telemetry/sampler"),
    "sampler-arg-above-one": (_with(BASE, **{"telemetry.samplerArg": 2}), "/telemetry/samplerArg"),
    "metrics-model-with-comma": (
        _with(BASE, **{"integrator.metrics.models": ["gpt-4o,o3"]}),
        "/integrator/metrics/models/0",
    ),
    "metrics-peer-ipblock-and-selector": (
        _with(BASE, **{"networkPolicy.metrics.from": [{"ipBlock": {"cidr": "10.0.0.1/32"}, "podSelector": {}}]}),
        "/networkPolicy/metrics/from/0",
    ),
    "llm-egress-port-as-string": (
        _with(BASE, **{"integrator.llmEgress": [{"cidr": "10.0.0.1/32", "ports": ["8000"]}]}),
        "/integrator/llmEgress/0/ports/0",
    ),
    "llm-egress-unknown-key": (
        _with(BASE, **{"integrator.llmEgress": [{"cidrs": ["10.0.0.1/32"], "ports": [8000]}]}),
        "/integrator/llmEgress/0",
    ),
    # null removes the default, as `--set tool.resources.limits=null` would
    "resources-without-limits": (_with(BASE, **{"tool.resources.limits": None}), "/tool/resources"),
}


@pytest.mark.parametrize(("values", "where"), list(SCHEMA_REFUSES.values()), ids=list(SCHEMA_REFUSES))
def test_schema_refuses(chart: helm_python.Chart, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(f"at '{where}")):
        chart.validate_schema(values)
