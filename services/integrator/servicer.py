"""gRPC face of the Integrator Engine."""

from __future__ import annotations

from typing import Any

import grpc

from altan.v1 import integrator_pb2, integrator_pb2_grpc
from altan.wire import dump_json, load_json, paginate
from services.integrator.audit import AuditLog
from services.integrator.calls import ToolCaller
from services.integrator.credentials import CredentialBroker

__all__ = ["IntegratorServicer"]

_CREDENTIAL_FIELDS = ("name", "type", "header", "prefix", "created_at", "updated_at")


def _credential(meta: dict[str, Any]) -> integrator_pb2.CredentialInfo:
    return integrator_pb2.CredentialInfo(**{k: meta.get(k) or "" for k in _CREDENTIAL_FIELDS})


class IntegratorServicer(integrator_pb2_grpc.IntegratorServiceServicer):
    def __init__(self, broker: CredentialBroker, caller: ToolCaller, audit: AuditLog) -> None:
        self._broker = broker
        self._caller = caller
        self._audit = audit

    async def PutCredential(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta, created = await self._broker.put(request.name, load_json(request.spec_json, "credential"))
        await self._audit.record("credential.put", credential=request.name)
        return integrator_pb2.PutCredentialResponse(credential=_credential(meta), created=created)

    async def ListCredentials(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        page, token = paginate(
            await self._broker.all(), request.page_size, request.page_token, default=100, maximum=500
        )
        return integrator_pb2.ListCredentialsResponse(
            credentials=[_credential(m) for m in page], next_page_token=token
        )

    async def DeleteCredential(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._broker.delete(request.name)
        await self._audit.record("credential.delete", credential=request.name)
        return integrator_pb2.DeleteCredentialResponse()

    async def InvokeTool(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        result = await self._caller.invoke(
            request.tool_id,
            load_json(request.arguments_json, "arguments", default={}),
            agent_id=request.agent_id,
            bound=list(request.bound_tool_ids),
            task_id=request.task_id,
            step_id=request.step_id,
        )
        return integrator_pb2.InvokeToolResponse(output_json=dump_json(result.output), http_status=result.http_status)

    async def DescribeTools(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tools, missing = await self._caller.describe(list(request.tool_ids))
        return integrator_pb2.DescribeToolsResponse(tools=tools, missing=missing)

    async def ListAuditEvents(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        events = await self._audit.query(request.task_id, request.limit)
        return integrator_pb2.ListAuditEventsResponse(events=[integrator_pb2.AuditEvent(**e) for e in events])
