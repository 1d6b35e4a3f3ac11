"""The environment the chart gives each service container is one that ``altan.config.Settings`` accepts: every
rendered scenario, with the ConfigMap and the Secret resolved as the kubelet would."""

from __future__ import annotations

import os

import pytest
from opentelemetry.sdk.trace import TracerProvider

from altan import telemetry

from .environment import service_settings
from .manifests import SERVICES, Render


def test_settings_accept_the_rendered_environment(rendered: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    for component in SERVICES:
        _, settings = service_settings(rendered, component, monkeypatch)
        assert settings.bind_host == "0.0.0.0"
        assert settings.jwt_audience == rendered.values["config"]["jwt"]["audience"]
        if component == "gateway":
            assert (settings.http_host, settings.http_port) == ("0.0.0.0", rendered.values["gateway"]["httpPort"])
            assert settings.grpc_port == rendered.values["gateway"]["grpcPort"]
            assert settings.max_body_bytes == rendered.values["gateway"]["maxBodyBytes"]
        else:
            assert getattr(settings, f"{component}_port") == rendered.values[component]["port"]
            metrics_port = rendered.values[component]["metrics"].get("port")
            assert getattr(settings, f"{component}_metrics_port") == metrics_port, component
        assert settings.trace_propagate_outbound == rendered.values["telemetry"]["propagateOutbound"]
        if component == "integrator":
            assert len(settings.master_key_bytes()) == 32
            assert str(settings.data_dir) == "/var/lib/altan"
        redis = rendered.values["redis"]["url"] or rendered.values["redis"]["urlInExistingSecret"]
        limit = rendered.values["gateway"]["tenantRateLimit"]
        if component == "gateway":
            assert settings.tenant_requests_per_second == limit["requestsPerSecond"]
            assert settings.tenant_burst == limit["burst"]
        # The gateway reaches Redis only to share the tenants' request-rate buckets among its replicas.
        uses_redis = component != "gateway" or limit["requestsPerSecond"] > 0
        assert (settings.redis_url is not None) == bool(redis and uses_redis), component
        # What a service opens for its state is never a file in the read-only root: Redis, or (without it) each
        # pod's memory, chosen explicitly.
        if uses_redis:
            assert settings.state_file() is None, component
            assert settings.state == ("sqlite" if redis else "memory"), component
        if rendered.values["redis"]["caCert"] and redis and uses_redis:
            assert "ssl_ca_certs=/etc/altan/redis-ca/ca.crt" in str(settings.redis_url), component


def test_tracing_starts_from_the_rendered_environment(rendered: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OTEL_* variables the chart renders are ones altan.telemetry and the OpenTelemetry SDK accept, as meant."""
    values = rendered.values["telemetry"]
    for component in SERVICES:
        environment, _ = service_settings(rendered, component, monkeypatch)
        with monkeypatch.context() as patch:
            for name in [n for n in os.environ if n.startswith("OTEL_")]:
                patch.delenv(name)
            for name, value in environment.items():
                patch.setenv(name, value)
            setup = telemetry.configure_tracing(component)
            try:
                assert setup.enabled == bool(values["otlp"]["endpoint"]), component
                if not setup.enabled:
                    continue
                provider: TracerProvider = setup._provider  # type: ignore[assignment]
                sampler = provider.sampler.get_description()
                if values["sampler"] == "parentbased_traceidratio":
                    assert f"TraceIdRatioBased{{{values['samplerArg']}}}" in sampler
                else:
                    assert values["sampler"].removeprefix("parentbased_").replace("_", "").lower() in sampler.lower()
                assert sampler.startswith("ParentBased"), sampler
                resource = provider.resource.attributes
                assert resource["service.name"] == f"altan-{component}"
                assert resource["k8s.namespace.name"] == rendered.namespace
            finally:
                setup.shutdown()
                telemetry.configure_tracing(component, environ={})
