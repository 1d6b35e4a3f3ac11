"""``python -m services.integrator``: the Integrator Engine."""

from __future__ import annotations

from contextlib import AsyncExitStack

from altan.bootstrap import ConfigurationError, run_service
from altan.clients import ToolClient
from altan.config import Settings
from altan.egress import EgressGuard, EgressPolicy
from altan.metrics import REGISTRY
from altan.outbound import GuardedHttpClient
from altan.server import GrpcService
from altan.store import SharedStore, TenantStore, open_state
from altan.tls import tls_files
from altan.v1 import integrator_pb2_grpc, runtime_pb2_grpc
from services.integrator.audit import AuditLog, open_audit_sink
from services.integrator.cache import ResponseCache
from services.integrator.calls import ToolCaller
from services.integrator.credentials import CredentialBroker
from services.integrator.llm.registry import PROVIDERS
from services.integrator.metrics import LlmMetrics
from services.integrator.models import InstallKey, ModelCaller
from services.integrator.oauth2 import OAuth2Flows
from services.integrator.secrets import open_secret_backend
from services.integrator.servicer import IntegratorRuntimeServicer, IntegratorServicer


def install_keys(settings: Settings) -> dict[str, InstallKey]:
    """The install's own LLM keys, each bound to the hosts it may be sent to."""
    keys = {}
    for provider, key, hosts in (
        ("openai", settings.openai_api_key, settings.openai_api_hosts),
        ("anthropic", settings.anthropic_api_key, settings.anthropic_api_hosts),
    ):
        if key is not None and key.get_secret_value():
            allowed = frozenset(h.strip().lower() for h in hosts.split(",") if h.strip())
            keys[provider] = InstallKey(key.get_secret_value(), allowed)
    return keys


def llm_metrics(settings: Settings) -> LlmMetrics | None:
    """The LLM metrics, with the process's others (served by run_service) when a metrics port is configured."""
    if settings.integrator_metrics_port is None:
        return None
    models = frozenset(m.strip() for m in settings.metrics_models.split(",") if m.strip())
    return LlmMetrics(REGISTRY, models)


async def wire(settings: Settings, stack: AsyncExitStack) -> list[GrpcService]:
    backend = open_state(settings)
    stack.push_async_callback(backend.aclose)
    tools = ToolClient(settings.tool_addr, settings.call_deadline_seconds, tls_files(settings))
    stack.push_async_callback(tools.aclose)
    store = TenantStore(backend, "integrator")
    sink = open_audit_sink(settings)
    if sink is not None:
        stack.push_async_callback(sink.aclose)
    audit = AuditLog(store, sink=sink)
    try:
        policy = EgressPolicy.parse(settings.egress_allow)
    except ValueError as exc:
        raise ConfigurationError(f"ALTAN_EGRESS_ALLOW: {exc}") from None
    secrets = open_secret_backend(settings, store)
    stack.push_async_callback(secrets.aclose)
    # OAuth2 token and revocation endpoints are outbound calls like any other, through the egress guard; they never
    # redirect (a redirect would carry the code or a refresh token elsewhere), and answer small documents.
    oauth2_http = GuardedHttpClient(
        EgressGuard(policy), max_redirects=0, timeout=settings.call_deadline_seconds, max_response_bytes=64 * 1024
    )
    stack.push_async_callback(oauth2_http.aclose)
    oauth2 = OAuth2Flows(
        store,
        SharedStore(backend, "integrator"),
        secrets,
        oauth2_http,
        audit,
        state_ttl_seconds=settings.oauth2_state_ttl_seconds,
        refresh_margin_seconds=settings.oauth2_refresh_margin_seconds,
        deadline_seconds=settings.call_deadline_seconds,
    )
    broker = CredentialBroker(store, secrets, oauth2)
    caller = ToolCaller(
        tools,
        broker,
        audit,
        attempts=settings.tool_retry_attempts,
        deadline_seconds=settings.call_deadline_seconds,
        retry_after_cap=settings.retry_after_cap_seconds,
        cache=ResponseCache(store),
        limits=store,
    )
    # LLM endpoints are outbound calls like any other: through the egress guard, one pooled client.
    http = GuardedHttpClient(
        EgressGuard(policy),
        timeout=settings.llm_deadline_seconds,
        max_response_bytes=settings.max_output_bytes,
        max_connections=settings.outbound_max_connections,
    )
    stack.push_async_callback(http.aclose)
    models = ModelCaller(
        http,
        broker,
        audit,
        attempts=settings.llm_retry_attempts,
        deadline_seconds=settings.llm_deadline_seconds,
        retry_after_cap=settings.retry_after_cap_seconds,
        install_keys=install_keys(settings),
        providers=PROVIDERS,
        metrics=llm_metrics(settings),
    )
    return [
        GrpcService(
            integrator_pb2_grpc.add_IntegratorServiceServicer_to_server,
            IntegratorServicer(broker, caller, audit),
            "altan.v1.IntegratorService",
            ready=backend.ping,
        ),
        GrpcService(
            runtime_pb2_grpc.add_IntegratorRuntimeServiceServicer_to_server,
            IntegratorRuntimeServicer(caller, models, audit),
            "altan.v1.IntegratorRuntimeService",
            ready=backend.ping,
        ),
    ]


if __name__ == "__main__":
    run_service("integrator", lambda s: s.integrator_port, wire)
