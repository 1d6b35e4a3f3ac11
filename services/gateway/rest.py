"""The public REST API of API.md, in front of the services over gRPC.

The gateway verifies the token itself (so garbage never reaches the services) and forwards it on every hop, where
each service verifies it again. All errors leave in one JSON shape; nothing here can answer with a stack trace.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from altan import context
from altan.auth import TokenVerifier
from altan.errors import AltanError, InvalidArgument, http_status_for
from altan.v1 import agent_pb2, integrator_pb2, tool_pb2
from altan.wire import MAX_JSON_DEPTH, dump_json, json_depth
from services.gateway.backends import Backends
from services.gateway.middleware import AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware
from services.gateway.views import agent_json, audit_json, credential_json, event_json, task_json, tool_json

__all__ = ["create_app"]

log = logging.getLogger(__name__)

async def _json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, whatever Content-Type the client sent (curl -d sends a form type)."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        raise InvalidArgument("body: not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body: must be a JSON object")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise InvalidArgument(f"body: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        dump_json(body).encode()
    except UnicodeEncodeError:
        raise InvalidArgument("body: strings must be valid Unicode (no lone surrogates)") from None
    return body



JsonObject = Annotated[dict[str, Any], Depends(_json_object)]
PageSize = Annotated[int, Query(ge=0, le=500)]
_EVENT_ID = re.compile(r"[0-9]{1,18}")
_HTTP_CODE_NAMES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 401: "UNAUTHENTICATED"}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _page(key: str, items: list[dict[str, Any]], token: str) -> dict[str, Any]:
    body: dict[str, Any] = {key: items}
    if token:
        body["next_page_token"] = token
    return body


def create_app(backends: Backends, verifier: TokenVerifier, max_body_bytes: int) -> FastAPI:
    """The REST application; ``backends`` must outlive it."""
    registry = CollectorRegistry()

    app = FastAPI(title="Altan", version="0.1.0", docs_url=None, redoc_url=None)
    # Authentication happens in AuthMiddleware, before FastAPI reads the body: no token, no parsing.
    api = APIRouter(prefix="/v1")
    agent, tool, integrator = backends.agent, backends.tool, backends.integrator

    # --- agents -------------------------------------------------------------------------------------------
    @api.post("/agents", status_code=201)
    async def create_agent(body: JsonObject) -> dict[str, Any]:
        answer = await agent.call("CreateAgent", agent_pb2.CreateAgentRequest(spec_json=dump_json(body)))
        return agent_json(answer.agent)

    @api.get("/agents")
    async def list_agents(page_size: PageSize = 0, page_token: str = "") -> dict[str, Any]:
        answer = await agent.call("ListAgents", agent_pb2.ListAgentsRequest(page_size=page_size, page_token=page_token))
        return _page("agents", [agent_json(a) for a in answer.agents], answer.next_page_token)

    @api.get("/agents/{agent_id}")
    async def get_agent(agent_id: str) -> dict[str, Any]:
        return agent_json((await agent.call("GetAgent", agent_pb2.GetAgentRequest(agent_id=agent_id))).agent)

    @api.patch("/agents/{agent_id}")
    async def update_agent(agent_id: str, body: JsonObject) -> dict[str, Any]:
        request = agent_pb2.UpdateAgentRequest(agent_id=agent_id, patch_json=dump_json(body))
        return agent_json((await agent.call("UpdateAgent", request)).agent)

    @api.delete("/agents/{agent_id}", status_code=204)
    async def delete_agent(agent_id: str) -> Response:
        await agent.call("DeleteAgent", agent_pb2.DeleteAgentRequest(agent_id=agent_id))
        return Response(status_code=204)

    # --- tools --------------------------------------------------------------------------------------------
    @api.get("/tools")
    async def list_tools(page_size: PageSize = 0, page_token: str = "") -> dict[str, Any]:
        answer = await tool.call("ListTools", tool_pb2.ListToolsRequest(page_size=page_size, page_token=page_token))
        return _page("tools", [tool_json(t) for t in answer.tools], answer.next_page_token)

    @api.post("/tools", status_code=201)
    async def create_tool(body: JsonObject) -> dict[str, Any]:
        return tool_json((await tool.call("CreateTool", tool_pb2.CreateToolRequest(spec_json=dump_json(body)))).tool)

    @api.get("/tools/{tool_id}")
    async def get_tool(tool_id: str) -> dict[str, Any]:
        return tool_json((await tool.call("GetTool", tool_pb2.GetToolRequest(tool_id=tool_id))).tool)

    @api.delete("/tools/{tool_id}", status_code=204)
    async def delete_tool(tool_id: str) -> Response:
        await tool.call("DeleteTool", tool_pb2.DeleteToolRequest(tool_id=tool_id))
        return Response(status_code=204)

    @api.post("/tools/{tool_id}/invoke")
    async def invoke_tool(tool_id: str, body: JsonObject) -> dict[str, Any]:
        unknown = set(body) - {"arguments"}
        if unknown:
            raise RequestValidationError([{"loc": ("body", sorted(unknown)[0]), "msg": "unknown field"}])
        request = integrator_pb2.InvokeToolRequest(tool_id=tool_id, arguments_json=dump_json(body.get("arguments", {})))
        answer = await integrator.call("InvokeTool", request)
        result: dict[str, Any] = {"output": json.loads(answer.output_json)}
        if answer.http_status:
            result["status"] = answer.http_status
        return result

    # --- credentials --------------------------------------------------------------------------------------
    @api.put("/credentials/{name}")
    async def put_credential(name: str, body: JsonObject) -> JSONResponse:
        request = integrator_pb2.PutCredentialRequest(name=name, spec_json=dump_json(body))
        answer = await integrator.call("PutCredential", request)
        return JSONResponse(credential_json(answer.credential), status_code=201 if answer.created else 200)

    @api.get("/credentials")
    async def list_credentials(page_size: PageSize = 0, page_token: str = "") -> dict[str, Any]:
        request = integrator_pb2.ListCredentialsRequest(page_size=page_size, page_token=page_token)
        answer = await integrator.call("ListCredentials", request)
        return _page("credentials", [credential_json(c) for c in answer.credentials], answer.next_page_token)

    @api.delete("/credentials/{name}", status_code=204)
    async def delete_credential(name: str) -> Response:
        await integrator.call("DeleteCredential", integrator_pb2.DeleteCredentialRequest(name=name))
        return Response(status_code=204)

    # --- tasks --------------------------------------------------------------------------------------------
    @api.post("/agents/{agent_id}/tasks", status_code=202)
    async def submit_task(
        agent_id: str, body: JsonObject, idempotency_key: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        unknown = set(body) - {"input", "idempotency_key"}
        if unknown or "input" not in body:
            field = sorted(unknown)[0] if unknown else "input"
            raise RequestValidationError([{"loc": ("body", field), "msg": "unknown field" if unknown else "required"}])
        key = body.get("idempotency_key", idempotency_key) or ""
        if not isinstance(key, str):
            raise RequestValidationError([{"loc": ("body", "idempotency_key"), "msg": "must be a string"}])
        request = agent_pb2.SubmitTaskRequest(
            agent_id=agent_id, input_json=dump_json(body["input"]), idempotency_key=key
        )
        answer = await agent.call("SubmitTask", request)
        return {"task_id": answer.task_id, "status": answer.status}

    @api.get("/tasks/{task_id}")
    async def get_task(task_id: str) -> dict[str, Any]:
        return task_json((await agent.call("GetTask", agent_pb2.GetTaskRequest(task_id=task_id))).task)

    @api.post("/tasks/{task_id}/cancel")
    async def cancel_task(task_id: str) -> dict[str, Any]:
        return task_json((await agent.call("CancelTask", agent_pb2.CancelTaskRequest(task_id=task_id))).task)

    @api.get("/tasks/{task_id}/events")
    async def task_events(
        task_id: str, last_event_id: Annotated[str | None, Header()] = None
    ) -> EventSourceResponse:
        await agent.call("GetTask", agent_pb2.GetTaskRequest(task_id=task_id))  # 404 before the stream starts
        after = int(last_event_id) if last_event_id and _EVENT_ID.fullmatch(last_event_id) else 0
        caller = context.current()

        async def stream() -> AsyncIterator[dict[str, Any]]:
            context.bind(caller)
            request = agent_pb2.StreamTaskEventsRequest(task_id=task_id, after_seq=after)
            async for event in agent.stream("StreamTaskEvents", request, timeout=3600):
                yield {"event": event.type, "id": str(event.seq), "data": dump_json(event_json(event))}

        return EventSourceResponse(stream(), ping=15)

    # --- audit --------------------------------------------------------------------------------------------
    @api.get("/audit")
    async def list_audit(task_id: str = "", limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        request = integrator_pb2.ListAuditEventsRequest(task_id=task_id, limit=limit)
        answer = await integrator.call("ListAuditEvents", request)
        return {"events": [audit_json(e) for e in answer.events]}

    app.include_router(api)

    # --- operations ---------------------------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        down = await backends.unhealthy()
        if down:
            return _error(503, "UNAVAILABLE", f"not ready: {', '.join(down)} not serving")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    _install_error_handlers(app)
    _document_bearer_auth(app)
    # The last added runs first: metrics see every answer, then the size limit, then authentication.
    app.add_middleware(AuthMiddleware, verifier=verifier)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, registry=registry)
    return app


def _document_bearer_auth(app: FastAPI) -> None:
    """Say in /openapi.json what AuthMiddleware enforces: every /v1 route takes a bearer JWT."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AltanError)
    async def domain_error(request: Request, exc: AltanError) -> JSONResponse:
        headers = {"Retry-After": str(int(exc.retry_after + 0.999))} if exc.retry_after is not None else None
        if exc.code.name == "UNAUTHENTICATED":
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        return _error(http_status_for(exc.code), exc.code.name, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = "body is not valid JSON" if first.get("type") == "json_invalid" else first.get("msg", "invalid")
        return _error(400, "INVALID_ARGUMENT", f"{where}: {message}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODE_NAMES.get(exc.status_code, "INVALID_ARGUMENT" if exc.status_code < 500 else "INTERNAL")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _error(500, "INTERNAL", "internal error")
