"""Custom tool definitions, their JSON Schemas, and the HTTP request a custom tool call becomes.

A tenant defines a custom tool in the seed's form (``parameters`` as a flat list) or with a full JSON Schema under
``input_schema``. :func:`parse_custom_tool` checks either, and always answers with an ``input_schema``, because
that is what the LLM sees and what :class:`ArgumentValidator` checks arguments against. Every problem is an
:class:`~altan.errors.InvalidArgument` whose message starts with the field at fault.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import OrderedDict
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from altan.errors import InvalidArgument
from services.tool import metaschema
from services.tool.bounded_validation import BoundedSchema
from services.tool.schema_bounds import check_bounds, check_document

__all__ = [
    "AUTH_TYPES",
    "HTTP_METHODS",
    "PARAMETER_TYPES",
    "TOOL_ID_PATTERN",
    "ArgumentValidator",
    "build_http_request",
    "parameters_to_schema",
    "parse_custom_tool",
]

TOOL_ID_PATTERN = r"^[a-z][a-z0-9_\-]{0,63}$"
PARAMETER_TYPES = frozenset({"string", "integer", "number", "boolean", "object", "array"})
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
AUTH_TYPES = ("oauth2", "api_key", "none")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
MAX_CACHEABLE_SECONDS = 365 * 24 * 3600
MAX_ENDPOINT_LENGTH = 2048
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"

_TOOL_ID = re.compile(TOOL_ID_PATTERN[1:-1])
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TOOL_FIELDS = frozenset(
    {
        "tool_id",
        "type",
        "name",
        "description",
        "parameters",
        "input_schema",
        "endpoint",
        "method",
        "auth",
        "credential",
        "cacheable_seconds",
        "fallback_tool_id",
    }
)
_PARAMETER_FIELDS = frozenset({"name", "type", "required", "description", "enum", "default", "items"})
# The message of a schema error may quote the offending value; keep it readable and bounded.
_MAX_ERROR_MESSAGE = 300


def parse_custom_tool(body: Any) -> dict[str, Any]:
    """Check a tenant's custom tool definition and return its normalized form.

    The result has ``type: "custom"``, every default filled in, an ``input_schema`` (converted from
    ``parameters`` when those were given, which are kept too; neither given means a tool without arguments),
    and ``credential`` / ``fallback_tool_id`` only when they were given.
    """
    if not isinstance(body, dict):
        raise InvalidArgument("tool: must be a JSON object")
    unknown = sorted(set(body) - _TOOL_FIELDS)
    if unknown:
        raise InvalidArgument(f"{unknown[0]}: unknown field")
    # A tool read back from the API carries type "custom"; accepting it lets a client send back what it read.
    if body.get("type", "custom") != "custom":
        raise InvalidArgument('type: must be "custom" (or omitted)')

    tool_id = _required_str(body, "tool_id")
    if not _TOOL_ID.fullmatch(tool_id):
        raise InvalidArgument(f"tool_id: must match {TOOL_ID_PATTERN}")
    tool: dict[str, Any] = {"tool_id": tool_id, "type": "custom", "name": _required_str(body, "name")}
    tool["description"] = _optional_str(body, "description", "")

    if "parameters" in body and "input_schema" in body:
        raise InvalidArgument("parameters: give either parameters or input_schema, not both")
    if "input_schema" in body:
        tool["input_schema"] = _check_input_schema(body["input_schema"])
    else:
        parameters = _parse_parameters(body.get("parameters", []))
        tool["parameters"] = parameters
        tool["input_schema"] = _check_input_schema(parameters_to_schema(parameters), field="parameters")

    tool["endpoint"] = _parse_endpoint(body.get("endpoint"), tool["input_schema"])
    method = _optional_str(body, "method", "POST").upper()
    if method not in HTTP_METHODS:
        raise InvalidArgument(f"method: must be one of {', '.join(HTTP_METHODS)}")
    tool["method"] = method

    auth = _optional_str(body, "auth", "none")
    if auth not in AUTH_TYPES:
        raise InvalidArgument(f"auth: must be one of {', '.join(AUTH_TYPES)}")
    tool["auth"] = auth
    if body.get("credential") is not None:
        tool["credential"] = _required_str(body, "credential")
    elif auth != "none":
        raise InvalidArgument(f"credential: required when auth is {auth}")

    seconds = body.get("cacheable_seconds", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 <= seconds <= MAX_CACHEABLE_SECONDS:
        raise InvalidArgument(f"cacheable_seconds: must be an integer from 0 to {MAX_CACHEABLE_SECONDS}")
    tool["cacheable_seconds"] = seconds

    if body.get("fallback_tool_id") is not None:
        fallback = _required_str(body, "fallback_tool_id")
        if not _TOOL_ID.fullmatch(fallback):
            raise InvalidArgument(f"fallback_tool_id: must match {TOOL_ID_PATTERN}")
        if fallback == tool_id:
            raise InvalidArgument("fallback_tool_id: a tool cannot be its own fallback")
        tool["fallback_tool_id"] = fallback
    return tool


def parameters_to_schema(parameters: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON Schema of a checked ``parameters`` list: a closed object, one property per parameter."""
    properties: dict[str, Any] = {}
    for parameter in parameters:
        prop: dict[str, Any] = {"type": parameter["type"]}
        for keyword in ("description", "enum", "default", "items"):
            if keyword in parameter:
                prop[keyword] = copy.deepcopy(parameter[keyword])
        properties[parameter["name"]] = prop
    return {
        "type": "object",
        "properties": properties,
        "required": [p["name"] for p in parameters if p["required"]],
        "additionalProperties": False,
    }


def _parse_parameters(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise InvalidArgument("parameters: must be a list")
    parameters: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        where = f"parameters[{index}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{where}: must be an object")
        unknown = sorted(set(item) - _PARAMETER_FIELDS)
        if unknown:
            raise InvalidArgument(f"{where}.{unknown[0]}: unknown field")
        name = item.get("name")
        if not isinstance(name, str) or not _PARAMETER_NAME.fullmatch(name):
            raise InvalidArgument(f"{where}.name: must match ^{_PARAMETER_NAME.pattern}$")
        if name in seen:
            raise InvalidArgument(f"{where}.name: duplicate parameter {name!r}")
        seen.add(name)
        if item.get("type") not in PARAMETER_TYPES:
            raise InvalidArgument(f"{where}.type: must be one of {', '.join(sorted(PARAMETER_TYPES))}")
        required = item.get("required", False)
        if not isinstance(required, bool):
            raise InvalidArgument(f"{where}.required: must be true or false")
        parameter: dict[str, Any] = {"name": name, "type": item["type"], "required": required}
        if "description" in item:
            if not isinstance(item["description"], str):
                raise InvalidArgument(f"{where}.description: must be a string")
            parameter["description"] = item["description"]
        if "enum" in item:
            if not isinstance(item["enum"], list) or not item["enum"]:
                raise InvalidArgument(f"{where}.enum: must be a non-empty list")
            parameter["enum"] = copy.deepcopy(item["enum"])
        if "items" in item:
            if item["type"] != "array" or not isinstance(item["items"], dict):
                raise InvalidArgument(f"{where}.items: only for type array, and must be a JSON Schema object")
            parameter["items"] = copy.deepcopy(item["items"])
        if "default" in item:
            _check_default(where, parameter, item["default"])
            parameter["default"] = copy.deepcopy(item["default"])
        parameters.append(parameter)
    return parameters


def _check_default(where: str, parameter: dict[str, Any], default: Any) -> None:
    schema = {k: parameter[k] for k in ("type", "enum") if k in parameter}
    try:
        Draft202012Validator(schema).validate(default)
    except ValidationError as exc:
        raise InvalidArgument(f"{where}.default: does not match the parameter's type or enum") from exc


def _check_input_schema(schema: Any, *, field: str = "input_schema") -> dict[str, Any]:
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


def _parse_endpoint(raw: Any, input_schema: dict[str, Any]) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidArgument("endpoint: required, an http or https URL")
    if len(raw) > MAX_ENDPOINT_LENGTH or any(c.isspace() or ord(c) < 0x20 for c in raw):
        raise InvalidArgument(f"endpoint: must be a URL of at most {MAX_ENDPOINT_LENGTH} characters, no spaces")
    try:
        parts = urlsplit(raw)
        hostname, _ = parts.hostname, parts.port  # .port raises ValueError on a bad port
    except ValueError as exc:
        raise InvalidArgument(f"endpoint: not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not hostname:
        raise InvalidArgument("endpoint: must be an http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("endpoint: must not carry user credentials; use auth and credential")
    if _PLACEHOLDER.search(parts.netloc + parts.query + parts.fragment):
        raise InvalidArgument("endpoint: {name} placeholders are only allowed in the path")
    declared = input_schema.get("properties", {})
    for name in _PLACEHOLDER.findall(parts.path):
        if name not in declared:
            raise InvalidArgument(f"endpoint: placeholder {{{name}}} does not name a declared parameter")
    return raw


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


def _required_str(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{field}: required, a non-empty string")
    return value


def _optional_str(body: dict[str, Any], field: str, default: str) -> str:
    value = body.get(field, default)
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: must be a string")
    return value


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
        validator = self.validator_for(tool_id, schema)
        try:
            error = validator.best_error(arguments)
        except Unresolvable as exc:
            raise InvalidArgument(f"input_schema: a $ref of tool {tool_id!r} does not resolve") from exc
        if error is not None:
            raise InvalidArgument(f"arguments{error.json_path[1:]}: {_short(error.message)}")
