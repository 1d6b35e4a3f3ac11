"""The public REST API of API.md, in front of the services over gRPC.

Every body is checked with the resource's model from :mod:`altan.api` (the same model the owning service checks the
proto with, so REST and public gRPC accept and refuse alike), turned into the proto, sent to the one public RPC of the
route, and the proto answer is rendered as the REST JSON. The gateway verifies the token itself (so garbage never
reaches the services) and forwards it on every hop, where each service verifies it again. All errors leave in one
JSON shape; nothing here can answer with a stack trace.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from altan import context
from altan.api import agents, audit, credentials, mcp, tasks, tools
from altan.api.common import describe_error
from altan.auth import TokenVerifier
from altan.errors import AltanError, InvalidArgument, code_for_http_status, error_body, http_response
from altan.metrics import encode, shared_collector
from altan.v1 import agent_pb2, integrator_pb2, tool_pb2
from altan.wire import dump_json, json_bytes, parse_json
from services.gateway.backends import Backends
from services.gateway.limits import TenantLimiter
from services.gateway.middleware import AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware
from services.gateway.openapi import Routes, openapi_document

__all__ = ["create_app"]

log = logging.getLogger(__name__)

PageSize = Annotated[int, Query(ge=0, le=500, description="Largest page wanted; 0 for the default.")]
PageToken = Annotated[str, Query(max_length=200, description="next_page_token of the previous page.")]
AgentId = Annotated[str, Path(max_length=200)]
ToolId = Annotated[str, Path(max_length=200)]
TaskId = Annotated[str, Path(max_length=200)]
CallId = Annotated[str, Path(max_length=200)]
ThreadId = Annotated[str, Path(max_length=200)]
CredentialName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]
McpServerName = Annotated[str, Path(pattern=mcp.MCP_SERVER_NAME_PATTERN)]
_EVENT_ID = re.compile(r"[0-9]{1,18}")


class Status(BaseModel):
    """An operational answer."""

    status: str


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_bytes(body), status_code=status, media_type="application/json", headers=headers)


def _page(key: str, items: list[dict[str, Any]], token: str) -> Response:
    body: dict[str, Any] = {key: items}
    if token:
        body["next_page_token"] = token
    return _json(body)


async def _body(request: Request) -> Any:
    """The request body as JSON, whatever Content-Type the client sent (curl -d sends a form type)."""
    raw = await request.body()
    if not raw:
        raise InvalidArgument("body: required, a JSON object")
    return parse_json(raw, "body")


def create_app(
    backends: Backends, verifier: TokenVerifier, max_body_bytes: int, limiter: TenantLimiter | None = None
) -> FastAPI:
    """The REST application; ``backends`` (and ``limiter``, the tenant's request rate) must outlive it."""
    registry = CollectorRegistry()
    registry.register(shared_collector())  # the process's gRPC, auth and rate-limit metrics (altan.metrics)
    app = FastAPI(
        title="Altan",
        version="0.1.0",
        description="Multi-tenant AI agent infrastructure: agents, tools, credentials, tasks and their audit trail.",
        docs_url=None,
        redoc_url=None,
        # The gateway traces and counts its requests itself (MetricsMiddleware): FastAPI's own telemetry would add
        # a second server span per request and, even off, looks up the tracer provider (os.environ) on each one.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    # Authentication happens in AuthMiddleware, before FastAPI reads the body: no token, no parsing.
    api = Routes(APIRouter(prefix="/v1"))
    agent, tool, integrator = backends.agent, backends.tool, backends.integrator

    # --- agents -------------------------------------------------------------------------------------------
    by_agent = {"agent_id": "$response.body#/id"}

    @api.route(
        "POST",
        "/agents",
        201,
        agents.Agent,
        "Create an agent",
        body=agents.AgentSpec,
        admin=True,
        links={
            "GetAgent": ("get_agent", by_agent),
            "UpdateAgent": ("update_agent", by_agent),
            "DeleteAgent": ("delete_agent", by_agent),
            "SubmitTask": ("submit_task", by_agent),
        },
    )
    async def create_agent(request: Request) -> Response:
        spec = agents.parse_agent_spec(await _body(request))
        request_pb = agent_pb2.CreateAgentRequest(agent=agents.agent_spec_to_proto(spec))
        answer = await agent.call(agent.agents.CreateAgent, request_pb)
        return _json(agents.agent_json(answer.agent), 201)

    @api.route("GET", "/agents", 200, agents.AgentList, "List agents")
    async def list_agents(page_size: PageSize = 0, page_token: PageToken = "") -> Response:
        request_pb = agent_pb2.ListAgentsRequest(page_size=page_size, page_token=page_token)
        answer = await agent.call(agent.agents.ListAgents, request_pb)
        return _page("agents", [agents.agent_json(a) for a in answer.agents], answer.next_page_token)

    @api.route("GET", "/agents/{agent_id}", 200, agents.Agent, "Read an agent")
    async def get_agent(agent_id: AgentId) -> Response:
        answer = await agent.call(agent.agents.GetAgent, agent_pb2.GetAgentRequest(agent_id=agent_id))
        return _json(agents.agent_json(answer.agent))

    @api.route("PATCH", "/agents/{agent_id}", 200, agents.Agent, "Change an agent", body=agents.AgentPatch, admin=True)
    async def update_agent(agent_id: AgentId, request: Request) -> Response:
        patch = agents.parse_agent_patch(await _body(request))
        fields, mask = agents.patch_to_proto(patch)
        request_pb = agent_pb2.UpdateAgentRequest(agent_id=agent_id, agent=fields, update_mask=mask)
        answer = await agent.call(agent.agents.UpdateAgent, request_pb)
        return _json(agents.agent_json(answer.agent))

    @api.route("DELETE", "/agents/{agent_id}", 204, None, "Delete an agent", admin=True)
    async def delete_agent(agent_id: AgentId) -> Response:
        await agent.call(agent.agents.DeleteAgent, agent_pb2.DeleteAgentRequest(agent_id=agent_id))
        return Response(status_code=204)

    # --- tools --------------------------------------------------------------------------------------------
    @api.route("GET", "/tools", 200, tools.ToolList, "List tools")
    async def list_tools(page_size: PageSize = 0, page_token: PageToken = "") -> Response:
        request_pb = tool_pb2.ListToolsRequest(page_size=page_size, page_token=page_token)
        answer = await tool.call(tool.catalog.ListTools, request_pb)
        return _page("tools", [tools.tool_json(t) for t in answer.tools], answer.next_page_token)

    @api.route(
        "POST",
        "/tools",
        201,
        tools.Tool,
        "Create a custom tool",
        body=tools.CustomToolSpec,
        admin=True,
        errors=(409,),
        links={
            "GetTool": ("get_tool", {"tool_id": "$response.body#/tool_id"}),
            "InvokeTool": ("invoke_tool", {"tool_id": "$response.body#/tool_id"}),
            "DeleteTool": ("delete_tool", {"tool_id": "$response.body#/tool_id"}),
        },
    )
    async def create_tool(request: Request) -> Response:
        spec = tools.parse_tool_spec(await _body(request))
        answer = await tool.call(
            tool.catalog.CreateTool, tool_pb2.CreateToolRequest(tool=tools.tool_spec_to_proto(spec))
        )
        return _json(tools.tool_json(answer.tool), 201)

    @api.route("GET", "/tools/{tool_id}", 200, tools.Tool, "Read a tool")
    async def get_tool(tool_id: ToolId) -> Response:
        answer = await tool.call(tool.catalog.GetTool, tool_pb2.GetToolRequest(tool_id=tool_id))
        return _json(tools.tool_json(answer.tool))

    @api.route("DELETE", "/tools/{tool_id}", 204, None, "Delete a custom tool", admin=True)
    async def delete_tool(tool_id: ToolId) -> Response:
        await tool.call(tool.catalog.DeleteTool, tool_pb2.DeleteToolRequest(tool_id=tool_id))
        return Response(status_code=204)

    @api.route(
        "POST",
        "/tools/{tool_id}/invoke",
        200,
        tools.InvokeResult,
        "Invoke a tool",
        body=tools.InvokeRequest,
        errors=(403,),
        description="Runs one tool through the integrator: credentials, egress rules, retries, audit.",
    )
    async def invoke_tool(tool_id: ToolId, request: Request) -> Response:
        invocation = tools.parse_invoke_request(await _body(request))
        request_pb = integrator_pb2.InvokeToolRequest(tool_id=tool_id, arguments_json=json_bytes(invocation.arguments))
        answer = await integrator.call(integrator.integrator.InvokeTool, request_pb)
        # The output is JSON the Tool Service wrote; it goes into the answer as it is, without a parse.
        output = answer.output_json or b"null"
        status = f',"status":{answer.http_status}' if answer.http_status else ""
        cached = ',"cached":true' if answer.cached else ""
        return Response(b'{"output":' + output + (status + cached).encode() + b"}", media_type="application/json")

    # --- credentials --------------------------------------------------------------------------------------
    @api.route(
        "PUT",
        "/credentials/{name}",
        200,
        credentials.Credential,
        "Store a credential",
        body=credentials.CredentialSpec,
        admin=True,
        also=(201,),
        description="201 when the credential was created, 200 when it replaced one. The answer is metadata only.",
        links={
            "GetCredential": ("get_credential", {"name": "$response.body#/name"}),
            "DeleteCredential": ("delete_credential", {"name": "$response.body#/name"}),
        },
    )
    async def put_credential(name: CredentialName, request: Request) -> Response:
        spec = credentials.parse_credential_spec(await _body(request))
        request_pb = integrator_pb2.PutCredentialRequest(
            name=name, credential=credentials.credential_spec_to_proto(spec)
        )
        answer = await integrator.call(integrator.integrator.PutCredential, request_pb)
        return _json(credentials.credential_json(answer.credential), 201 if answer.created else 200)

    @api.route("GET", "/credentials", 200, credentials.CredentialList, "List credentials")
    async def list_credentials(page_size: PageSize = 0, page_token: PageToken = "") -> Response:
        request_pb = integrator_pb2.ListCredentialsRequest(page_size=page_size, page_token=page_token)
        answer = await integrator.call(integrator.integrator.ListCredentials, request_pb)
        return _page(
            "credentials", [credentials.credential_json(c) for c in answer.credentials], answer.next_page_token
        )

    @api.route("GET", "/credentials/{name}", 200, credentials.Credential, "Read a credential's metadata")
    async def get_credential(name: CredentialName) -> Response:
        answer = await integrator.call(
            integrator.integrator.GetCredential, integrator_pb2.GetCredentialRequest(name=name)
        )
        return _json(credentials.credential_json(answer.credential))

    @api.route("DELETE", "/credentials/{name}", 204, None, "Delete a credential", admin=True)
    async def delete_credential(name: CredentialName) -> Response:
        await integrator.call(integrator.integrator.DeleteCredential, integrator_pb2.DeleteCredentialRequest(name=name))
        return Response(status_code=204)

    @api.route(
        "POST",
        "/credentials/{name}/authorize",
        200,
        credentials.Authorization,
        "Start the OAuth2 flow of a credential",
        admin=True,
        description=(
            "Authorization code with PKCE (S256) for an oauth2 credential, from any status (re-authorization "
            "included): send the user's browser to authorization_url; the provider redirects it to the credential's "
            "redirect_uri with a code and the state, which GET /v1/oauth2/callback takes."
        ),
    )
    async def authorize_credential(name: CredentialName) -> Response:
        request_pb = integrator_pb2.AuthorizeCredentialRequest(name=name)
        answer = await integrator.call(integrator.integrator.AuthorizeCredential, request_pb)
        return _json({"authorization_url": answer.authorization_url, "state": answer.state})

    @api.route(
        "GET",
        "/oauth2/callback",
        200,
        credentials.OAuth2Connected,
        "Finish an OAuth2 flow",
        auth=False,
        errors=(400, 403, 429, 503, 504),
        description=(
            "The redirect_uri the provider sends the browser back to. Takes no bearer token: the one-time state names "
            "the tenant and the credential. An unknown, used or expired state is 400 and changes nothing."
        ),
    )
    async def oauth2_callback(
        state: Annotated[str, Query(min_length=1, max_length=512)],
        code: Annotated[str, Query(max_length=4096)] = "",
        error: Annotated[str, Query(max_length=256, description="The provider's error instead of a code.")] = "",
    ) -> Response:
        request_pb = integrator_pb2.FinishOAuth2Request(code=code, state=state, error=error)
        answer = await integrator.call(integrator.integrator.FinishOAuth2, request_pb)
        return _json({"credential": answer.credential, "status": credentials.credential_status_name(answer.status)})

    # --- MCP servers --------------------------------------------------------------------------------------
    @api.route(
        "PUT",
        "/mcp-servers/{name}",
        200,
        mcp.McpServer,
        "Register an MCP server",
        body=mcp.McpServerSpec,
        admin=True,
        also=(201,),
        description=(
            "201 when the server was registered, 200 when it replaced one. The integrator connects to the server "
            "(streamable HTTP, through the egress rules, with the credential when one is named), lists its tools, "
            "and they join the tenant's tools as `<name>__<tool>`, type mcp. An unreachable server is 503."
        ),
        links={
            "GetMcpServer": ("get_mcp_server", {"name": "$response.body#/name"}),
            "DeleteMcpServer": ("delete_mcp_server", {"name": "$response.body#/name"}),
        },
    )
    async def put_mcp_server(name: McpServerName, request: Request) -> Response:
        spec = mcp.parse_mcp_server_spec(await _body(request))
        request_pb = integrator_pb2.PutMcpServerRequest(server=mcp.server_spec_to_proto(name, spec))
        answer = await integrator.call(integrator.integrator.PutMcpServer, request_pb)
        return _json(mcp.mcp_server_json(answer.server), 201 if answer.created else 200)

    @api.route("GET", "/mcp-servers", 200, mcp.McpServerList, "List MCP servers")
    async def list_mcp_servers(page_size: PageSize = 0, page_token: PageToken = "") -> Response:
        request_pb = tool_pb2.ListMcpServersRequest(page_size=page_size, page_token=page_token)
        answer = await tool.call(tool.catalog.ListMcpServers, request_pb)
        return _page("mcp_servers", [mcp.mcp_server_json(s) for s in answer.servers], answer.next_page_token)

    @api.route("GET", "/mcp-servers/{name}", 200, mcp.McpServer, "Read an MCP server")
    async def get_mcp_server(name: McpServerName) -> Response:
        answer = await tool.call(tool.catalog.GetMcpServer, tool_pb2.GetMcpServerRequest(name=name))
        return _json(mcp.mcp_server_json(answer.server))

    @api.route("DELETE", "/mcp-servers/{name}", 204, None, "Delete an MCP server (and so its tools)", admin=True)
    async def delete_mcp_server(name: McpServerName) -> Response:
        await tool.call(tool.catalog.DeleteMcpServer, tool_pb2.DeleteMcpServerRequest(name=name))
        return Response(status_code=204)

    # --- tasks --------------------------------------------------------------------------------------------
    @api.route(
        "POST",
        "/agents/{agent_id}/tasks",
        202,
        tasks.TaskAccepted,
        "Submit a task",
        body=tasks.TaskSubmission,
        description="The Idempotency-Key header may carry the idempotency key instead of the body.",
        links={
            "GetTask": ("get_task", {"task_id": "$response.body#/task_id"}),
            "FollowTask": ("task_events", {"task_id": "$response.body#/task_id"}),
            "CancelTask": ("cancel_task", {"task_id": "$response.body#/task_id"}),
        },
    )
    async def submit_task(
        agent_id: AgentId,
        request: Request,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Response:
        return _json(await submit(agent_id, await request.body(), idempotency_key), 202)

    async def submit(agent_id: str, raw: bytes, idempotency_key: str | None) -> dict[str, Any]:
        """The route's work, shared with :class:`_SubmitFastPath`: the accepted task's answer, or an AltanError."""
        if not raw:
            raise InvalidArgument("body: required, a JSON object")
        body = parse_json(raw, "body")
        if isinstance(body, dict) and idempotency_key and "idempotency_key" not in body:
            body = {**body, "idempotency_key": idempotency_key}
        submission = tasks.parse_submission(body)
        request_pb = agent_pb2.SubmitTaskRequest(
            agent_id=agent_id,
            input_json=json_bytes(submission.input),
            idempotency_key=submission.idempotency_key or "",
            thread_id=submission.thread_id or "",
        )
        answer = await agent.call(agent.agents.SubmitTask, request_pb)
        return {
            "task_id": answer.task_id,
            "status": tasks.task_status_name(answer.status),
            "thread_id": answer.thread_id or None,
        }

    @api.route("GET", "/tasks/{task_id}", 200, tasks.Task, "Read a task")
    async def get_task(task_id: TaskId) -> Response:
        answer = await agent.call(agent.agents.GetTask, agent_pb2.GetTaskRequest(task_id=task_id))
        return _json(tasks.task_json(answer.task))

    @api.route("POST", "/tasks/{task_id}/cancel", 200, tasks.Task, "Cancel a task")
    async def cancel_task(task_id: TaskId) -> Response:
        answer = await agent.call(agent.agents.CancelTask, agent_pb2.CancelTaskRequest(task_id=task_id))
        return _json(tasks.task_json(answer.task))

    @api.route(
        "POST",
        "/tasks/{task_id}/approvals/{call_id}",
        200,
        tasks.Task,
        "Approve or reject a call that waits for approval",
        body=tasks.ApprovalDecision,
        admin=True,
        errors=(409,),
        description="call_id is the one of the task's approval.requested event. A decided call is 409.",
    )
    async def decide_approval(task_id: TaskId, call_id: CallId, request: Request) -> Response:
        decision = tasks.parse_decision(await _body(request))
        request_pb = agent_pb2.DecideApprovalRequest(
            task_id=task_id, call_id=call_id, approve=decision.approve, comment=decision.comment
        )
        answer = await agent.call(agent.agents.DecideApproval, request_pb)
        return _json(tasks.task_json(answer.task))

    @api.route(
        "GET",
        "/tasks/{task_id}/events",
        200,
        "sse",
        "Follow a task's events",
        description="Server-Sent Events; the SSE id is the event's seq, and Last-Event-ID resumes after it.",
    )
    async def task_events(
        task_id: TaskId, last_event_id: Annotated[str | None, Header(max_length=200)] = None
    ) -> EventSourceResponse:
        await agent.call(agent.agents.GetTask, agent_pb2.GetTaskRequest(task_id=task_id))  # 404 before the stream
        after = int(last_event_id) if last_event_id and _EVENT_ID.fullmatch(last_event_id) else 0
        caller = context.current()

        async def stream() -> AsyncIterator[dict[str, Any]]:
            context.bind(caller)
            request_pb = agent_pb2.StreamTaskEventsRequest(task_id=task_id, after_seq=after)
            async for answer in agent.stream(agent.agents.StreamTaskEvents, request_pb, timeout=3600):
                event = answer.event
                yield {"event": event.type, "id": str(event.seq), "data": dump_json(tasks.event_json(event))}

        return EventSourceResponse(stream(), ping=15)

    @api.route("GET", "/threads/{thread_id}", 200, tasks.Thread, "Read a conversation")
    async def get_thread(thread_id: ThreadId, page_size: PageSize = 0, page_token: PageToken = "") -> Response:
        request_pb = agent_pb2.GetThreadRequest(thread_id=thread_id, page_size=page_size, page_token=page_token)
        answer = await agent.call(agent.agents.GetThread, request_pb)
        return _json(tasks.thread_json(answer.thread, answer.next_page_token))

    # --- audit --------------------------------------------------------------------------------------------
    @api.route("GET", "/audit", 200, audit.AuditList, "Read the audit trail")
    async def list_audit(
        task_id: Annotated[str, Query(max_length=200)] = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        request_pb = integrator_pb2.ListAuditEventsRequest(task_id=task_id, limit=limit)
        answer = await integrator.call(integrator.integrator.ListAuditEvents, request_pb)
        return _json({"events": [audit.audit_json(e) for e in answer.events]})

    app.include_router(api.router)

    # --- operations ---------------------------------------------------------------------------------------
    ops = Routes(APIRouter())

    @ops.route("GET", "/healthz", 200, Status, "Liveness", auth=False)
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @ops.route(
        "GET",
        "/readyz",
        200,
        Status,
        "Readiness: all three services answer their health checks",
        auth=False,
        errors=(503,),
    )
    async def readyz() -> Response:
        down = await backends.unhealthy()
        if down:
            return _json(
                error_body("UNAVAILABLE", f"not ready: {', '.join(down)} not serving"), 503, {"Retry-After": "1"}
            )
        return _json({"status": "ready"})

    @ops.route("GET", "/metrics", 200, "text", "Prometheus metrics (text, or OpenMetrics)", auth=False)
    async def metrics(request: Request) -> Response:
        body, content_type = encode(registry, request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})

    app.include_router(ops.router)

    operations = {**api.operations, **ops.operations}
    extra_models = [tasks.TaskEvent]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, operations, extra_models)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    _install_error_handlers(app)
    # The last added runs first: metrics see every answer, then the size limit, then authentication.
    tokenless = frozenset(path for (_, path), operation in api.operations.items() if not operation.auth)
    submit_route = next(r for r in api.router.routes if isinstance(r, APIRoute) and r.name == "submit_task")
    app.add_middleware(_SubmitFastPath, submit=submit, route=submit_route)  # innermost: after authentication
    app.add_middleware(AuthMiddleware, verifier=verifier, limiter=limiter, tokenless_paths=tokenless)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, registry=registry)
    return app


_SUBMIT_PATH = re.compile(r"/v1/agents/([^/]{1,200})/tasks")
_JSON_HEADERS = [(b"content-type", b"application/json")]


class _SubmitFastPath:
    """``POST /v1/agents/{agent_id}/tasks``, the route a burst of work hits, answered without FastAPI's routing,
    dependency injection and exception layers (a third of the gateway's CPU per submission, measured with
    bench/plan_burst.py). It runs inside the authentication, size limit and metrics middlewares, does what the route
    does (one shared function) and answers errors as the handlers do; a request it is not sure of (an agent id or an
    ``Idempotency-Key`` over the route's limits) goes on to the route, which answers it as always."""

    def __init__(self, app: ASGIApp, submit: Any, route: APIRoute) -> None:
        self.app = app
        self.submit = submit
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _SUBMIT_PATH.fullmatch(scope["path"])
        key = None
        for name, value in scope["headers"] if match is not None else ():
            if name == b"idempotency-key" and key is None:
                key = value.decode("latin-1")
        if match is None or (key is not None and len(key) > 200):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # what the metrics and the trace name it by
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        status, headers = 202, _JSON_HEADERS
        try:
            body: Any = await self.submit(match.group(1), b"".join(chunks), key)
        except AltanError as exc:
            status, body, extra = http_response(exc)
            headers = [*_JSON_HEADERS, *((k.lower().encode(), v.encode()) for k, v in extra.items())]
        except Exception as exc:
            log.error("unhandled error", exc_info=exc)
            status, body = 500, error_body("INTERNAL", "internal error")
        raw = json_bytes(body)
        start = [(b"content-length", str(len(raw)).encode()), *headers]
        await send({"type": "http.response.start", "status": status, "headers": start})
        await send({"type": "http.response.body", "body": raw})


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods.update(route.methods or ())
    return sorted(methods)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AltanError)
    async def domain_error(request: Request, exc: AltanError) -> Response:
        status, body, headers = http_response(exc)
        return _json(body, status, headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        message = describe_error(first, "request", skip=("body", "query", "path", "header"))
        return _json(error_body("INVALID_ARGUMENT", message), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; a path has one route per method here.
            headers["Allow"] = ", ".join(_allowed_methods(app, request.url.path))
        return _json(error_body(code_for_http_status(exc.status_code), str(exc.detail)), exc.status_code, headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return _json(error_body("INTERNAL", "internal error"), 500)
