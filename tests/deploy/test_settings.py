"""The environment the chart gives each service container is one that ``altan.config.Settings`` accepts: every
rendered scenario, with the ConfigMap and the Secret resolved as the kubelet would."""

from __future__ import annotations

import pytest

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
