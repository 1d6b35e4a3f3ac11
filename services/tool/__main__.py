"""``python -m services.tool``: the Tool Service."""

from __future__ import annotations

from contextlib import AsyncExitStack

from altan.bootstrap import ConfigurationError, run_service
from altan.clients import ToolContainerClient
from altan.config import Settings
from altan.egress import EgressGuard, EgressPolicy
from altan.outbound import GuardedHttpClient
from altan.server import GrpcService
from altan.store import TenantStore, open_state
from altan.v1 import runtime_pb2_grpc, tool_pb2_grpc
from services.tool.builtins import BUILTIN_TOOLS
from services.tool.containers import ContainerTools
from services.tool.executor import ToolExecutor
from services.tool.mcp import McpServers
from services.tool.registry import ToolRegistry
from services.tool.schema import ArgumentValidator
from services.tool.servicer import ToolRuntimeServicer, ToolServicer


async def wire(settings: Settings, stack: AsyncExitStack) -> list[GrpcService]:
    try:
        policy = EgressPolicy.parse(settings.egress_allow)
    except ValueError as exc:
        raise ConfigurationError(f"ALTAN_EGRESS_ALLOW: {exc}") from None
    backend = open_state(settings)
    stack.push_async_callback(backend.aclose)
    guard = EgressGuard(policy)
    # A body larger than an output may be is not even read to the end.
    http = GuardedHttpClient(
        guard,
        timeout=settings.call_deadline_seconds,
        max_response_bytes=settings.max_output_bytes,
        max_connections=settings.outbound_max_connections,
    )
    stack.push_async_callback(http.aclose)
    deadline = settings.call_deadline_seconds
    containers = ContainerTools(
        settings.tool_containers,
        reserved=BUILTIN_TOOLS,
        refresh_seconds=settings.tool_containers_refresh_seconds,
        max_output_bytes=settings.max_output_bytes,
        connect=lambda address: ToolContainerClient(address, deadline),
    )
    stack.push_async_callback(containers.aclose)
    await containers.start()  # the containers that are up are in the catalogue before the service answers
    if settings.tool_discovery == "kubernetes":
        await _discover(settings, containers, stack)
    store = TenantStore(backend, "tool")
    mcp = McpServers(store, http.transport, default_timeout=deadline, relist_seconds=settings.mcp_relist_seconds)
    stack.push_async_callback(mcp.aclose)  # before the HTTP client's pools: the sessions' DELETEs go through them
    registry = ToolRegistry(store, containers, mcp)
    executor = ToolExecutor(
        registry, http, ArgumentValidator(), containers=containers, mcp=mcp, default_timeout=deadline
    )
    return [
        GrpcService(
            tool_pb2_grpc.add_ToolServiceServicer_to_server,
            ToolServicer(registry, mcp),
            "altan.v1.ToolService",
            ready=backend.ping,
        ),
        GrpcService(
            runtime_pb2_grpc.add_ToolRuntimeServiceServicer_to_server,
            ToolRuntimeServicer(executor, mcp, settings.max_output_bytes),
            "altan.v1.ToolRuntimeService",
            ready=backend.ping,
        ),
    ]


async def _discover(settings: Settings, containers: ContainerTools, stack: AsyncExitStack) -> None:
    """Tool containers from the labelled Services of the namespace, as they come and go."""
    # Imported here: only an install with discovery on pays for the client.
    from kubernetes.config import ConfigException

    from services.tool.kubernetes_discovery import ServiceWatch, core_api, service_namespace

    try:
        namespace = service_namespace(settings.tool_discovery_namespace)
        api = core_api()
    except (ValueError, ConfigException) as exc:
        raise ConfigurationError(f"ALTAN_TOOL_DISCOVERY=kubernetes: {exc}") from None
    stack.callback(api.api_client.close)
    services = ServiceWatch(api, namespace, containers.discovered, address_mode=settings.tool_discovery_address)
    stack.push_async_callback(services.aclose)
    await services.start(wait_seconds=5.0)


if __name__ == "__main__":
    run_service("tool", lambda s: s.tool_port, wire)
