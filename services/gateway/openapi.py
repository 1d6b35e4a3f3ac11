"""The OpenAPI document of the REST API, from the same pydantic models that validate requests.

Each route is declared with :class:`Routes`, which records what it takes (a body model), what it answers (a status
and a response model) and which errors it may answer; :func:`openapi_document` then writes request bodies,
responses (every status, with the one error shape) and component schemas from those models, so the document says
exactly what the gateway does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from altan.api.common import ErrorBody
from altan.errors import ERROR_STATUSES

__all__ = ["Operation", "Routes", "openapi_document"]

Handler = Callable[..., Any]
_REF = "#/components/schemas/{model}"
# Every /v1 operation may answer these: a malformed request, no valid token, over a rate limit, a service or the
# state store unreachable, a deadline passed.
_ALWAYS = (400, 401, 429, 503, 504)


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers."""

    summary: str
    status: int
    response: type[BaseModel] | Literal["sse", "text"] | None = None
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    description: str = ""
    auth: bool = True
    also: tuple[int, ...] = ()  # other success statuses with the same response
    # OpenAPI links from the success response: name -> (operationId, {parameter: runtime expression}).
    links: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)


@dataclass
class Routes:
    """Registers routes on a router and remembers their :class:`Operation`, by ``(method, path)``."""

    router: APIRouter
    operations: dict[tuple[str, str], Operation] = field(default_factory=dict)

    def route(
        self,
        method: str,
        path: str,
        status: int,
        response: type[BaseModel] | Literal["sse", "text"] | None,
        summary: str,
        *,
        body: type[BaseModel] | None = None,
        admin: bool = False,
        description: str = "",
        auth: bool = True,
        errors: tuple[int, ...] = (),
        also: tuple[int, ...] = (),
        links: dict[str, tuple[str, dict[str, str]]] | None = None,
    ) -> Callable[[Handler], Handler]:
        """Register ``handler`` for ``method path``; the usual errors of an authenticated route are implied."""
        found = set(errors)
        if auth:
            found.update(_ALWAYS)
            if "{" in path:
                found.add(404)
            if admin:
                found.add(403)
            if body is not None:
                found.add(413)
        operation = Operation(
            summary, status, response, body, tuple(sorted(found)), description, auth, also, links or {}
        )

        def register(handler: Handler) -> Handler:
            self.operations[(method.lower(), self.router.prefix + path)] = operation
            self.router.add_api_route(
                path, handler, methods=[method], status_code=status, summary=summary, operation_id=handler.__name__
            )
            return handler

        return register


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_STATUSES[status],
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorBody")}}},
    }
    if status in (429, 503):
        response["headers"] = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return response


def _success(operation: Operation, names: dict[Any, Any]) -> dict[str, Any]:
    if operation.response == "sse":
        return {
            "description": "Server-Sent Events: one JSON TaskEvent per event, ending with the terminal one.",
            # One parsed event (OpenAPI 3.1 reads `schema` per event; 3.2 calls it itemSchema).
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {
                            "id": {"type": "string", "description": "The event's sequence number (Last-Event-ID)."},
                            "event": {"type": "string", "description": "The event's type, as in data.type."},
                            "data": {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": {"$ref": _REF.format(model="TaskEvent")},
                                "description": "The TaskEvent, as JSON.",
                            },
                            "retry": {"type": "integer"},
                        },
                    }
                }
            },
        }
    if operation.response == "text":
        return {"description": operation.summary, "content": {"text/plain": {"schema": {"type": "string"}}}}
    if operation.response is None:
        return {"description": "Done; no content."}
    return {
        "description": operation.summary,
        "content": {"application/json": {"schema": names[(operation.response, "serialization")]}},
    }


def openapi_document(
    app: FastAPI, operations: dict[tuple[str, str], Operation], extra: Sequence[type[BaseModel]]
) -> dict[str, Any]:
    """The whole document: FastAPI's paths and parameters, then bodies, responses and schemas from the models."""
    document = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
    models: dict[tuple[type[BaseModel], str], None] = {(ErrorBody, "serialization"): None}
    for operation in operations.values():
        if operation.body is not None:
            models[(operation.body, "validation")] = None
        if isinstance(operation.response, type):
            models[(operation.response, "serialization")] = None
    for model in extra:
        models[(model, "serialization")] = None
    names, definitions = models_json_schema(list(models), ref_template=_REF)  # type: ignore[arg-type]

    for (method, path), operation in operations.items():
        entry = document["paths"][path][method]
        if operation.description:
            entry["description"] = operation.description
        if operation.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": names[(operation.body, "validation")]}},
            }
        responses: dict[str, Any] = {}
        for status in (operation.status, *operation.also):
            responses[str(status)] = _success(operation, names)
            if operation.links:
                responses[str(status)]["links"] = {
                    name: {"operationId": target, "parameters": parameters}
                    for name, (target, parameters) in operation.links.items()
                }
        for status in operation.errors:
            responses[str(status)] = _error_response(status)
        entry["responses"] = responses
        entry["security"] = [{"bearer": []}] if operation.auth else []

    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(definitions.get("$defs", {}))
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
    return document
