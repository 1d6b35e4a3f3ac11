"""``python -m services.integrator``: the Integrator Engine."""

from __future__ import annotations

from contextlib import AsyncExitStack

from altan.bootstrap import run_service
from altan.clients import ToolClient
from altan.config import Settings
from altan.server import GrpcService
from altan.store import TenantStore, open_backend
from altan.v1 import integrator_pb2_grpc, runtime_pb2_grpc
from services.integrator.audit import AuditLog
from services.integrator.calls import ToolCaller
from services.integrator.credentials import CredentialBroker
from services.integrator.secrets import LocalSecretBackend
from services.integrator.servicer import IntegratorRuntimeServicer, IntegratorServicer


async def wire(settings: Settings, stack: AsyncExitStack) -> list[GrpcService]:
    backend = open_backend(settings.redis_url)
    stack.push_async_callback(backend.aclose)
    tools = ToolClient(settings.tool_addr, settings.call_deadline_seconds)
    stack.push_async_callback(tools.aclose)
    store = TenantStore(backend, "integrator")
    audit = AuditLog(store)
    broker = CredentialBroker(store, LocalSecretBackend(store, settings.master_key_bytes()))
    caller = ToolCaller(
        tools,
        broker,
        audit,
        attempts=settings.tool_retry_attempts,
        deadline_seconds=settings.call_deadline_seconds,
        retry_after_cap=settings.retry_after_cap_seconds,
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
            IntegratorRuntimeServicer(caller),
            "altan.v1.IntegratorRuntimeService",
            ready=backend.ping,
        ),
    ]


if __name__ == "__main__":
    run_service("integrator", lambda s: s.integrator_port, wire)
