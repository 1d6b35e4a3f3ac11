"""gRPC faces of the Integrator Engine: the public service, and the runtime calls of the Agent Service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from altan.api.audit import audit_to_proto
from altan.api.credentials import credential_spec_from_proto, credential_to_proto
from altan.context import require_admin, with_task
from altan.server import Context
from altan.v1 import integrator_pb2, integrator_pb2_grpc, runtime_pb2, runtime_pb2_grpc
from altan.wire import paginate
from services.integrator.audit import AuditLog
from services.integrator.calls import ToolCaller
from services.integrator.credentials import CredentialBroker
from services.integrator.models import ModelCaller

__all__ = ["IntegratorRuntimeServicer", "IntegratorServicer"]


class IntegratorServicer(integrator_pb2_grpc.IntegratorServiceServicer):
    """Credentials, direct tool invocations and the audit trail (public)."""

    def __init__(self, broker: CredentialBroker, caller: ToolCaller, audit: AuditLog) -> None:
        self._broker = broker
        self._caller = caller
        self._audit = audit

    async def PutCredential(
        self, request: integrator_pb2.PutCredentialRequest, context: Context
    ) -> integrator_pb2.PutCredentialResponse:
        meta, created = await self._broker.put(request.name, credential_spec_from_proto(request.credential))
        await self._audit.record("credential.put", credential=request.name)
        return integrator_pb2.PutCredentialResponse(credential=credential_to_proto(meta), created=created)

    async def GetCredential(
        self, request: integrator_pb2.GetCredentialRequest, context: Context
    ) -> integrator_pb2.GetCredentialResponse:
        return integrator_pb2.GetCredentialResponse(
            credential=credential_to_proto(await self._broker.get(request.name))
        )

    async def ListCredentials(
        self, request: integrator_pb2.ListCredentialsRequest, context: Context
    ) -> integrator_pb2.ListCredentialsResponse:
        page, token = paginate(
            await self._broker.all(), request.page_size, request.page_token, default=100, maximum=500
        )
        return integrator_pb2.ListCredentialsResponse(
            credentials=[credential_to_proto(m) for m in page], next_page_token=token
        )

    async def DeleteCredential(
        self, request: integrator_pb2.DeleteCredentialRequest, context: Context
    ) -> integrator_pb2.DeleteCredentialResponse:
        await self._broker.delete(request.name)
        await self._audit.record("credential.delete", credential=request.name)
        return integrator_pb2.DeleteCredentialResponse()

    async def AuthorizeCredential(
        self, request: integrator_pb2.AuthorizeCredentialRequest, context: Context
    ) -> integrator_pb2.AuthorizeCredentialResponse:
        url, state = await self._broker.authorize(request.name)
        return integrator_pb2.AuthorizeCredentialResponse(authorization_url=url, state=state)

    async def FinishOAuth2(
        self, request: integrator_pb2.FinishOAuth2Request, context: Context
    ) -> integrator_pb2.FinishOAuth2Response:
        # Tokenless (altan.server.TOKENLESS_METHODS): the state names the tenant, and the broker binds it.
        name = await self._broker.finish_oauth2(request.code, request.state, request.error)
        return integrator_pb2.FinishOAuth2Response(credential=name, status=integrator_pb2.CREDENTIAL_STATUS_CONNECTED)

    async def PutMcpServer(
        self, request: integrator_pb2.PutMcpServerRequest, context: Context
    ) -> integrator_pb2.PutMcpServerResponse:
        server, created = await self._caller.put_mcp_server(request.server)
        return integrator_pb2.PutMcpServerResponse(server=server, created=created)

    async def InvokeTool(
        self, request: integrator_pb2.InvokeToolRequest, context: Context
    ) -> integrator_pb2.InvokeToolResponse:
        result = await self._caller.invoke(request.tool_id, request.arguments_json or b"{}")
        return integrator_pb2.InvokeToolResponse(
            output_json=result.output_json, http_status=result.http_status, cached=result.cached
        )

    async def ListAuditEvents(
        self, request: integrator_pb2.ListAuditEventsRequest, context: Context
    ) -> integrator_pb2.ListAuditEventsResponse:
        events = await self._audit.query(request.task_id, request.limit)
        return integrator_pb2.ListAuditEventsResponse(events=[audit_to_proto(e) for e in events])


class IntegratorRuntimeServicer(runtime_pb2_grpc.IntegratorRuntimeServiceServicer):
    """Tool calls and LLM turns of agents' tasks (internal: the agent and task of a call are the Agent Service's
    word)."""

    def __init__(self, caller: ToolCaller, models: ModelCaller, audit: AuditLog) -> None:
        self._caller = caller
        self._models = models
        self._audit = audit

    async def RecordApproval(
        self, request: runtime_pb2.RecordApprovalRequest, context: Context
    ) -> runtime_pb2.RecordApprovalResponse:
        require_admin("deciding an approval")
        with_task(request.task_id)
        verdict = "approved" if request.approved else "rejected"
        reason = f"call '{request.call_id}' {verdict}" + (f": {request.comment}" if request.comment else "")
        # A rejected call is one a person refused: "denied", as the platform's own refusals are.
        outcome = "ok" if request.approved else "denied"
        await self._audit.record("approval.decide", tool_id=request.tool_id, outcome=outcome, reason=reason)
        return runtime_pb2.RecordApprovalResponse()

    async def Complete(
        self, request: runtime_pb2.CompleteRequest, context: Context
    ) -> AsyncIterator[runtime_pb2.CompleteResponse]:
        # The turn runs beside this stream: its text is passed on as it arrives, then the whole answer.
        deltas: asyncio.Queue[str | None] = asyncio.Queue()

        async def on_delta(text: str) -> None:
            await deltas.put(text)

        async def turn() -> runtime_pb2.ModelAnswer:
            try:
                return await self._models.complete(request, on_delta if request.stream else None)
            finally:
                await deltas.put(None)

        running = asyncio.create_task(turn())
        try:
            while (text := await deltas.get()) is not None:
                yield runtime_pb2.CompleteResponse(delta=text)
            yield runtime_pb2.CompleteResponse(answer=await running)
        finally:
            running.cancel()

    async def RunTool(self, request: runtime_pb2.RunToolRequest, context: Context) -> runtime_pb2.RunToolResponse:
        result = await self._caller.invoke(
            request.tool_id,
            request.arguments_json or b"{}",
            agent_id=request.agent_id,
            bound=list(request.bound_tool_ids),
            task_id=request.task_id,
            step_id=request.step_id,
            approval_gate=not request.approved,
        )
        return runtime_pb2.RunToolResponse(
            output_json=result.output_json,
            http_status=result.http_status,
            approval_required=result.approval_required,
        )

    async def DescribeTools(
        self, request: runtime_pb2.DescribeToolsRequest, context: Context
    ) -> runtime_pb2.DescribeToolsResponse:
        tools, missing = await self._caller.describe(list(request.tool_ids))
        return runtime_pb2.DescribeToolsResponse(tools=tools, missing=missing)
