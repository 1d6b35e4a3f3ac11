"""A tool container: every ``@tool`` of a module served over gRPC (``altan serve-tools module.py --port N``).

It is served like every Altan service (``altan.server``): the caller's bearer token is verified on each call and
binds the tenant, health and reflection answer, SIGTERM drains. ListTools alone needs no token: the Tool Service
lists its containers on its own schedule, outside any request, and a tool's description holds no tenant's data.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from altan import context
from altan.auth import TokenVerifier
from altan.config import Settings
from altan.delegation import refuse_signing_key
from altan.errors import NotFound
from altan.sdk._tool import Tool, ToolContext, ToolCredential
from altan.server import Context, GrpcService, serve_until_stopped
from altan.v1 import container_pb2, container_pb2_grpc

__all__ = ["SERVICE_NAME", "ToolContainerServicer", "load_tools", "serve_tools"]

SERVICE_NAME = "altan.v1.ToolContainerService"


class ToolContainerServicer(container_pb2_grpc.ToolContainerServiceServicer):
    """Lists the tools and runs one call at a time each, as the verified caller."""

    def __init__(self, tools: Sequence[Tool[..., object]]) -> None:
        self._tools = {t.tool_id: t for t in tools}
        self._definitions = [t.definition() for t in tools]

    async def ListTools(
        self, request: container_pb2.ListContainerToolsRequest, context: Context
    ) -> container_pb2.ListContainerToolsResponse:
        return container_pb2.ListContainerToolsResponse(tools=self._definitions)

    async def InvokeTool(
        self, request: container_pb2.InvokeContainerToolRequest, ctx: Context
    ) -> container_pb2.InvokeContainerToolResponse:
        tool = self._tools.get(request.tool_id)
        if tool is None:
            raise NotFound(f"tool '{request.tool_id}' is not served by this container")
        caller = context.current()
        timeout = request.timeout_seconds or None
        remaining = ctx.time_remaining()
        if remaining is not None:
            timeout = min(timeout or remaining, remaining)
        credential = None
        if request.HasField("credential"):  # for this call only: it lives in this request's context and no longer
            c = request.credential
            credential = ToolCredential(name=c.name, value=c.value, header=c.header, prefix=c.prefix)
        caller_context = ToolContext(caller.tenant_id, caller.user, caller.role, credential, request.idempotency_key)
        output = await tool.invoke(request.arguments_json, caller_context, timeout)
        return container_pb2.InvokeContainerToolResponse(output_json=output)


def load_tools(source: str) -> list[Tool[..., object]]:
    """The tools of a module, given as a file (``weather.py``) or a dotted name (``mypackage.tools``), in the order
    the module holds them. Raises ``ValueError`` naming the problem (nothing found, one tool id twice)."""
    path = Path(source)
    if source.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ValueError(f"{source}: no such file")
        # As `python weather.py` would: the file's folder first on the path, so that it imports its neighbours.
        sys.path.insert(0, str(path.resolve().parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"{source}: not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    tools: dict[str, Tool[..., object]] = {}
    for value in list(vars(module).values()):
        if isinstance(value, Tool):
            if value.tool_id in tools and tools[value.tool_id] is not value:
                raise ValueError(f"{source}: two tools are named '{value.tool_id}'")
            tools[value.tool_id] = value
    if not tools:
        raise ValueError(f"{source}: no @tool functions (from altan.sdk import tool)")
    return list(tools.values())


async def serve_tools(
    tools: Sequence[Tool[..., object]], settings: Settings, address: str, stop: asyncio.Event
) -> None:
    """Serve ``tools`` on ``address`` until ``stop`` is set, then drain (``altan.server.serve_until_stopped``).

    Raises :class:`altan.config.ConfigurationError` when given the agent's private key: a container only verifies.
    """
    refuse_signing_key(settings, "tool container")
    service = GrpcService(
        container_pb2_grpc.add_ToolContainerServiceServicer_to_server, ToolContainerServicer(tools), SERVICE_NAME
    )
    await serve_until_stopped(
        [service],
        # A task's calls come with its delegation, verified with ALTAN_DELEGATION_PUBLIC_KEYS_FILE (public keys only).
        verifier=TokenVerifier(settings, accept_delegation=True),
        address=address,
        grace_seconds=settings.shutdown_grace_seconds,
        stop=stop,
    )
