"""Custom tool definitions, their JSON Schemas, and the HTTP request a custom tool call becomes.

A tenant defines a custom tool in the seed's form (``parameters`` as a flat list) or with a full JSON Schema under
``input_schema``. :func:`parse_custom_tool` checks either, and always answers with an ``input_schema``, because
that is what the LLM sees and what :class:`ArgumentValidator` checks arguments against. Every problem is an
:class:`~altan.errors.InvalidArgument` whose message starts with the field at fault.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
from collections import OrderedDict
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from jsonschema.exceptions import SchemaError
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from altan.api.tools import CustomToolSpec, parse_tool_spec
from altan.errors import InvalidArgument
from services.tool import metaschema
from services.tool.bounded_validation import BoundedSchema
from services.tool.schema_bounds import check_bounds, check_document

__all__ = [
    "ArgumentValidator",
    "build_http_request",
    "check_custom_tool",
    "check_input_schema",
    "parse_custom_tool",
]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# The message of a schema error may quote the offending value; keep it readable and bounded.
_MAX_ERROR_MESSAGE = 300


def parse_custom_tool(body: Any) -> dict[str, Any]:
    """Check a tenant's custom tool (a REST body, or the fields of a proto) and return its normalized form.

    :func:`altan.api.tools.parse_tool_spec` checks the shape (the same model the gateway checks a REST body with);
    here the ``input_schema`` is checked as a JSON Schema. The result is :meth:`CustomToolSpec.stored`.
    """
    return check_custom_tool(parse_tool_spec(body))


def check_custom_tool(spec: CustomToolSpec) -> dict[str, Any]:
    """The normalized tool of a validated spec, once its ``input_schema`` passes as a JSON Schema."""
    tool = spec.stored()
    field = "parameters" if spec.input_schema is None else "input_schema"
    tool["input_schema"] = check_input_schema(tool["input_schema"], field=field)
    return tool


def check_input_schema(schema: Any, *, field: str = "input_schema") -> dict[str, Any]:
    """A copy of a tenant's JSON Schema for arguments, once it is valid and its evaluation bounded."""
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{field}: must be a JSON Schema object")
    if schema.get("$schema", DRAFT_2020_12) != DRAFT_2020_12:
        raise InvalidArgument(f"{field}: $schema must be {DRAFT_2020_12} (or omitted)")
    check_document(schema, field)  # before anything walks it: the checks below take time in its size
    try:
        metaschema.check_schema(schema)
    except SchemaError as exc:
        raise InvalidArgument(f"{field}{exc.json_path[1:]}: {_short(exc.message)}") from exc
    if schema.get("type") != "object":
        raise InvalidArgument(f'{field}: must have "type": "object"')
    _check_references(schema, field)
    check_bounds(schema, field)
    return copy.deepcopy(schema)


def _check_references(schema: dict[str, Any], field: str) -> None:
    """Refuse references that would leave the schema, and local ones that lead nowhere."""
    root: Resource[Any] = DRAFT202012.create_resource(schema)
    base = root.id() or "urn:altan:input-schema"
    resolver = Registry().with_resource(base, root).crawl().resolver(base_uri=base)
    pending = [(root, resolver)]
    while pending:  # iterative, so a deeply nested schema cannot exhaust the stack
        resource, resolver = pending.pop()
        contents = resource.contents
        if isinstance(contents, dict):
            for keyword in ("$ref", "$dynamicRef"):
                ref = contents.get(keyword)
                if not isinstance(ref, str):
                    continue
                if not ref.startswith("#"):
                    raise InvalidArgument(f"{field}: {keyword} {ref!r} is remote; only local references (#...)")
                try:
                    resolver.lookup(ref)
                except Unresolvable as exc:
                    raise InvalidArgument(f"{field}: {keyword} {ref!r} does not resolve") from exc
        pending.extend((sub, resolver.in_subresource(sub)) for sub in resource.subresources())


def build_http_request(
    tool: dict[str, Any], arguments: dict[str, Any]
) -> tuple[str, str, dict[str, str | list[str]] | None, dict[str, Any] | None]:
    """Turn a call of a custom tool into ``(method, url, query_params, json_body)``.

    ``{name}`` placeholders in the endpoint's path take the argument of that name, percent-encoded with nothing
    left safe, so a value can never add or climb a path segment, or start a query or a fragment. The arguments
    left over become the JSON body (POST, PUT, PATCH; ``{}`` when none are left) or the query parameters
    (GET, DELETE; ``None`` when none are left).
    """
    method = tool.get("method", "POST")
    parts = urlsplit(tool["endpoint"])
    remaining = dict(arguments)
    used: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in arguments:
            raise InvalidArgument(f"arguments: {name!r} is required to fill {{{name}}} in the endpoint")
        used.add(name)
        return quote(_path_text(name, arguments[name]), safe="")

    segments = []
    for segment in parts.path.split("/"):
        filled = _PLACEHOLDER.sub(fill, segment)
        # "." and ".." are unreserved, so quote() keeps them; as a whole segment they would climb the path.
        if filled in (".", "..") and filled != segment:
            filled = filled.replace(".", "%2E")
        segments.append(filled)
    path = "/".join(segments)
    for name in used:
        remaining.pop(name, None)
    url = urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))
    if method in BODY_METHODS:
        return method, url, None, remaining
    params = {name: _query_value(value) for name, value in remaining.items() if value is not None}
    return method, url, params or None, None


def _path_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise InvalidArgument(f"arguments: {name!r} fills a path placeholder and must be a string or a number")


def _query_value(value: Any) -> str | list[str]:
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return [_query_scalar(v) for v in value]
    return _query_scalar(value)


def _query_scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    # Booleans, numbers and null read as JSON would; nested structures travel as JSON text.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _short(message: str) -> str:
    # The middle goes: a quoted value comes first, and what is wrong with it ("is too long") last.
    if len(message) <= _MAX_ERROR_MESSAGE:
        return message
    return message[: _MAX_ERROR_MESSAGE - 63] + "..." + message[-60:]


class ArgumentValidator:
    """Checks tool arguments against the tool's ``input_schema``, compiling each schema once.

    Compiled validators are kept per ``(tool_id, schema fingerprint)``, so a changed schema under the same
    ``tool_id`` gets a new validator; the least recently used ones are dropped beyond ``max_entries``. A check
    never takes more than a bounded amount of work (:mod:`services.tool.bounded_validation`).
    """

    def __init__(self, max_entries: int = 1024) -> None:
        self._max_entries = max_entries
        self._cache: OrderedDict[tuple[str, str], BoundedSchema] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def validator_for(self, tool_id: str, schema: dict[str, Any]) -> BoundedSchema:
        """The compiled validator of ``schema``, from the cache when it has been seen before."""
        fingerprint = hashlib.sha256(
            json.dumps(schema, sort_keys=True, separators=(",", ":"), default=str).encode()
        ).hexdigest()
        key = (tool_id, fingerprint)
        validator = self._cache.get(key)
        if validator is None:
            validator = BoundedSchema(schema)
            self._cache[key] = validator
            if len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return validator

    def validate(self, tool_id: str, schema: dict[str, Any], arguments: Any) -> None:
        """Raise InvalidArgument naming the JSON path of the most relevant error, if ``arguments`` do not fit."""
        if not isinstance(arguments, dict):
            raise InvalidArgument("arguments: must be a JSON object")
        _raise_for(tool_id, self.validator_for(tool_id, schema), arguments)

    async def check(self, tool_id: str, schema: dict[str, Any], arguments: Any, *, offload: bool = False) -> None:
        """:meth:`validate`; with ``offload``, the check itself runs in a worker thread.

        A large document's check may spend its whole budget (about 50 ms of CPU). In a thread it shares the
        interpreter with the event loop instead of holding it, so other tenants' calls go on meanwhile. Small
        documents are checked inline: the thread hop would cost more than the check.
        """
        if not isinstance(arguments, dict):
            raise InvalidArgument("arguments: must be a JSON object")
        validator = self.validator_for(tool_id, schema)  # the cache is touched by the event loop only
        if offload:
            await asyncio.to_thread(_raise_for, tool_id, validator, arguments)
        else:
            _raise_for(tool_id, validator, arguments)


def _raise_for(tool_id: str, validator: BoundedSchema, arguments: dict[str, Any]) -> None:
    try:
        error = validator.best_error(arguments)
    except Unresolvable as exc:
        raise InvalidArgument(f"input_schema: a $ref of tool {tool_id!r} does not resolve") from exc
    if error is not None:
        raise InvalidArgument(f"arguments{error.json_path[1:]}: {_short(error.message)}")
