"""Tools: the catalogue's entries, custom tools in the seed's form, and tool invocations (API.md "Custom tool").

:class:`CustomToolSpec` checks everything about a custom tool that does not need the JSON Schema machinery; the
Tool Service then checks ``input_schema`` itself (a valid, bounded schema) before it stores the tool.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from altan.api.common import (
    ABSENT,
    ApiModel,
    HttpUrl,
    JsonObject,
    Name,
    Timestamp,
    check_struct_bytes,
    exact_numbers,
    validate,
)
from altan.api.convert import (
    enum_name,
    enum_value,
    list_to_python,
    python_to_list,
    python_to_struct,
    python_to_value,
    rfc3339,
    struct_to_dict,
    timestamp,
    value_to_python,
)
from altan.v1 import common_pb2, tool_pb2

__all__ = [
    "MAX_CACHEABLE_SECONDS",
    "OUTPUT_ONLY",
    "SELF_CONTAINED_BUILTINS",
    "TOOL_ID_PATTERN",
    "CustomToolSpec",
    "InvokeRequest",
    "InvokeResult",
    "Parameter",
    "RateLimit",
    "Tool",
    "ToolList",
    "parameters_to_schema",
    "parse_invoke_request",
    "parse_tool_spec",
    "tool_json",
    "tool_spec_from_proto",
    "tool_spec_to_proto",
    "tool_to_proto",
]

TOOL_ID_PATTERN = r"^[a-z][a-z0-9_\-]{0,63}$"
# Built-in tools that touch nothing outside their arguments: no credential, no fallback, no outbound call. The
# Integrator runs them without first reading their definition (tests/unit/test_api_models.py keeps this in step
# with the Tool Service's built-ins).
SELF_CONTAINED_BUILTINS = frozenset({"parse_email", "json_extract", "text_template"})
MAX_CACHEABLE_SECONDS = 365 * 24 * 3600
OUTPUT_ONLY = ("created_at",)

_AUTH = common_pb2.AuthType.DESCRIPTOR
_TYPE = tool_pb2.ToolType.DESCRIPTOR
_METHOD = tool_pb2.HttpMethod.DESCRIPTOR
_PARAMETER_TYPE = tool_pb2.ParameterType.DESCRIPTOR
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}

ToolId = Annotated[str, Field(pattern=TOOL_ID_PATTERN)]
ParameterName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")]
ExactJson = Annotated[JsonValue, AfterValidator(exact_numbers)]


def _is_json_type(value: Any, json_type: str) -> bool:
    if isinstance(value, bool) and json_type != "boolean":
        return False
    if json_type == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES[json_type])


class Parameter(ApiModel):
    """One argument in the seed's form."""

    model_config = ConfigDict(
        json_schema_extra={"if": {"required": ["items"]}, "then": {"properties": {"type": {"const": "array"}}}}
    )

    name: ParameterName
    type: Literal["string", "integer", "number", "boolean", "object", "array"]
    required: bool = False
    description: str = Field(default=ABSENT, max_length=10_000)
    enum: list[ExactJson] = Field(default=ABSENT, min_length=1, max_length=1000, description="Allowed values.")
    default: ExactJson = Field(default=ABSENT, description="The value when a call leaves the argument out.")
    items: JsonObject = Field(default=ABSENT, description="JSON Schema of the items (type array only).")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.items is not None and self.type != "array":
            raise ValueError("items: only for type array")
        if "default" in self.model_fields_set:
            if not _is_json_type(self.default, self.type):
                raise ValueError(f"default: must be of type {self.type}")
            if self.enum is not None and self.default not in self.enum:
                raise ValueError("default: must be one of enum")
        return self

    def stored(self) -> dict[str, Any]:
        """The normalized form: name, type and required always; the rest only when given."""
        given = self.model_dump(exclude_unset=True)
        return {"name": self.name, "type": self.type, "required": self.required, **given}


class RateLimit(ApiModel):
    """At most ``requests`` calls per ``per_seconds`` seconds, per tenant, across all replicas."""

    requests: int = Field(ge=1, le=1_000_000)
    per_seconds: int = Field(ge=1, le=86_400)


def parameters_to_schema(parameters: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON Schema of normalized ``parameters``: a closed object, one property per parameter."""
    properties: dict[str, Any] = {}
    for parameter in parameters:
        prop: dict[str, Any] = {"type": parameter["type"]}
        for keyword in ("description", "enum", "default", "items"):
            if keyword in parameter:
                prop[keyword] = parameter[keyword]
        properties[parameter["name"]] = prop
    return {
        "type": "object",
        "properties": properties,
        "required": [p["name"] for p in parameters if p["required"]],
        "additionalProperties": False,
    }


class CustomToolSpec(ApiModel):
    """A custom tool in the seed's form: an HTTP endpoint, its arguments, how it authenticates (at most 5,000 JSON
    values in all)."""

    max_values = 5000

    # What the checks below say, as far as JSON Schema can say it (the OpenAPI document shows it).
    model_config = ConfigDict(
        json_schema_extra={
            "not": {"required": ["parameters", "input_schema"]},
            "if": {"properties": {"auth": {"enum": ["oauth2", "api_key"]}}, "required": ["auth"]},
            "then": {"required": ["credential"]},
        }
    )

    tool_id: ToolId
    type: Literal["custom"] = Field(default="custom", description="Read back as custom; nothing else is accepted.")
    name: str = Field(min_length=1, max_length=200, pattern=r"\S")
    description: str = Field(default="", max_length=10_000)
    parameters: list[Parameter] = Field(default=ABSENT, max_length=100)
    input_schema: JsonObject = Field(default=ABSENT, description="A JSON Schema instead of parameters.")
    endpoint: HttpUrl
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    auth: Literal["oauth2", "api_key", "none"] = "none"
    credential: Name = Field(default=ABSENT, description="The credential injected into the call (required with auth).")
    rate_limit: RateLimit = Field(default=ABSENT)
    requires_approval: bool = False
    cacheable_seconds: int = Field(default=0, ge=0, le=MAX_CACHEABLE_SECONDS)
    fallback_tool_id: ToolId = Field(default=ABSENT)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, raw: str) -> str:
        try:
            parts = urlsplit(raw)
            hostname, _ = parts.hostname, parts.port  # .port raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from None
        if not hostname:
            raise ValueError("must be an http or https URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry user credentials; use auth and credential")
        if _PLACEHOLDER.search(parts.netloc + parts.query + parts.fragment):
            raise ValueError("{name} placeholders are only allowed in the path")
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.parameters is not None and self.input_schema is not None:
            raise ValueError("parameters: give either parameters or input_schema, not both")
        if self.auth != "none" and self.credential is None:
            raise ValueError(f"credential: required when auth is {self.auth}")
        if self.fallback_tool_id == self.tool_id:
            raise ValueError("fallback_tool_id: a tool cannot be its own fallback")
        names = {p.name for p in self.parameters or ()}
        if len(names) != len(self.parameters or ()):
            raise ValueError("parameters: a parameter name is used twice")
        declared = names if self.input_schema is None else set(_properties(self.input_schema))
        for name in _PLACEHOLDER.findall(urlsplit(self.endpoint).path):
            if name not in declared:
                raise ValueError(f"endpoint: placeholder {{{name}}} does not name a declared parameter")
        return self

    def stored(self) -> dict[str, Any]:
        """The normalized tool: every default filled in, an ``input_schema`` always (from ``parameters`` when
        those were given; neither given means a tool without arguments), optional fields only when given."""
        tool: dict[str, Any] = {
            "tool_id": self.tool_id,
            "type": "custom",
            "name": self.name,
            "description": self.description,
        }
        if self.input_schema is not None:
            tool["input_schema"] = self.input_schema
        else:
            parameters = [p.stored() for p in self.parameters or ()]
            tool["parameters"] = parameters
            tool["input_schema"] = parameters_to_schema(parameters)
        tool.update(endpoint=self.endpoint, method=self.method, auth=self.auth)
        if self.credential is not None:
            tool["credential"] = self.credential
        if self.rate_limit is not None:
            tool["rate_limit"] = self.rate_limit.model_dump()
        tool["requires_approval"] = self.requires_approval
        tool["cacheable_seconds"] = self.cacheable_seconds
        if self.fallback_tool_id is not None:
            tool["fallback_tool_id"] = self.fallback_tool_id
        return tool


def _properties(schema: dict[str, Any]) -> dict[str, Any]:
    properties = schema.get("properties")
    return properties if isinstance(properties, dict) else {}


class Tool(BaseModel):
    """A tool as the API answers it; custom tools carry their HTTP fields."""

    tool_id: str
    type: Literal["builtin", "custom", "container", "mcp"]
    name: str
    description: str
    input_schema: dict[str, JsonValue] = Field(description="JSON Schema of the arguments.")
    parameters: list[Parameter] | None = None
    endpoint: str | None = None
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] | None = None
    auth: Literal["oauth2", "api_key", "none"] | None = None
    credential: str | None = None
    rate_limit: RateLimit | None = None
    requires_approval: bool | None = None
    cacheable_seconds: int | None = None
    fallback_tool_id: str | None = None
    created_at: Timestamp | None = None


class ToolList(BaseModel):
    """One page of tools: built-in first, then container tools by id, then custom by creation time."""

    tools: list[Tool]
    next_page_token: str | None = Field(default=ABSENT, description="Present when there is another page.")


class InvokeRequest(ApiModel):
    """A direct invocation of a tool."""

    # Not walked here: they pass as JSON to the Tool Service, which checks them against the tool's input_schema.
    arguments: dict[str, Any] = Field(default_factory=dict, description="Checked against the input_schema.")


class InvokeResult(BaseModel):
    """What a tool answered."""

    output: JsonValue = Field(description="The output; for HTTP tools the response body, parsed when JSON.")
    status: int | None = Field(default=ABSENT, description="The third party's HTTP status (HTTP tools only).")
    cached: bool | None = Field(
        default=ABSENT, description="Present and true when answered from the tenant's cache (`cacheable_seconds`)."
    )


def parse_invoke_request(body: Any) -> InvokeRequest:
    return validate(InvokeRequest, body, "body")


def parse_tool_spec(body: Any) -> CustomToolSpec:
    """A custom tool to create, from a REST body or a proto (via :func:`tool_spec_from_proto`)."""
    return validate(CustomToolSpec, body, "tool", output_only=OUTPUT_ONLY)


# --- protos -----------------------------------------------------------------------------------------------


def _parameter_to_proto(parameter: dict[str, Any], out: tool_pb2.Parameter) -> None:
    out.name = parameter["name"]
    out.type = enum_value(_PARAMETER_TYPE, parameter["type"])  # type: ignore[assignment]
    out.required = parameter.get("required", False)
    out.description = parameter.get("description") or ""
    if "enum" in parameter:
        python_to_list(parameter["enum"], out.enum)
    if "default" in parameter:
        python_to_value(parameter["default"], out.default)
    if "items" in parameter:
        python_to_struct(parameter["items"], out.items)


def _parameter_from_proto(msg: tool_pb2.Parameter) -> dict[str, Any]:
    parameter: dict[str, Any] = {}
    if msg.name:
        parameter["name"] = msg.name
    if msg.type:
        parameter["type"] = enum_name(_PARAMETER_TYPE, msg.type) or f"unknown type {msg.type}"
    if msg.required:
        parameter["required"] = True
    if msg.description:
        parameter["description"] = msg.description
    if msg.HasField("enum"):
        parameter["enum"] = list_to_python(msg.enum)
    if msg.HasField("default"):
        parameter["default"] = value_to_python(msg.default)
    if msg.HasField("items"):
        parameter["items"] = struct_to_dict(msg.items)
    return parameter


def _fields_to_proto(tool: dict[str, Any], out: tool_pb2.Tool) -> None:
    out.tool_id = tool["tool_id"]
    out.type = enum_value(_TYPE, tool.get("type", "custom"))  # type: ignore[assignment]
    out.name = tool.get("name", "")
    out.description = tool.get("description", "")
    if tool.get("input_schema") is not None:
        python_to_struct(tool["input_schema"], out.input_schema)
    for parameter in tool.get("parameters") or ():
        _parameter_to_proto(parameter, out.parameters.add())
    if "endpoint" in tool:
        out.endpoint = tool["endpoint"]
        out.method = enum_value(_METHOD, tool.get("method", "POST").lower())  # type: ignore[assignment]
        out.auth = enum_value(_AUTH, tool.get("auth", "none"))  # type: ignore[assignment]
    out.credential = tool.get("credential") or ""
    if tool.get("rate_limit"):
        out.rate_limit.requests = tool["rate_limit"]["requests"]
        out.rate_limit.per_seconds = tool["rate_limit"]["per_seconds"]
    out.requires_approval = tool.get("requires_approval", False)
    out.cacheable_seconds = tool.get("cacheable_seconds", 0)
    out.fallback_tool_id = tool.get("fallback_tool_id") or ""


def tool_spec_to_proto(spec: CustomToolSpec) -> tool_pb2.Tool:
    """The proto of a validated custom tool, as given (the gateway's half of CreateTool)."""
    out = tool_pb2.Tool()
    given = spec.model_dump(exclude_none=True)
    if spec.parameters is not None:
        given["parameters"] = [p.stored() for p in spec.parameters]
    _fields_to_proto(given, out)
    return out


def tool_spec_from_proto(msg: tool_pb2.Tool) -> CustomToolSpec:
    """The custom tool of a CreateTool request, checked by the same model as a REST body."""
    check_struct_bytes(msg.input_schema.ByteSize() + sum(p.ByteSize() for p in msg.parameters), "tool")
    fields: dict[str, Any] = {"created_at": True} if msg.HasField("created_at") else {}
    if msg.tool_id:
        fields["tool_id"] = msg.tool_id
    if msg.type:
        fields["type"] = enum_name(_TYPE, msg.type) or f"unknown type {msg.type}"
    for name in ("name", "description", "endpoint", "credential", "fallback_tool_id"):
        if getattr(msg, name):
            fields[name] = getattr(msg, name)
    if msg.HasField("input_schema"):
        fields["input_schema"] = struct_to_dict(msg.input_schema)
    if msg.parameters:
        fields["parameters"] = [_parameter_from_proto(p) for p in msg.parameters]
    if msg.method:
        fields["method"] = (enum_name(_METHOD, msg.method) or f"unknown method {msg.method}").upper()
    if msg.auth:
        fields["auth"] = enum_name(_AUTH, msg.auth) or f"unknown auth {msg.auth}"
    if msg.HasField("rate_limit"):
        fields["rate_limit"] = {"requests": msg.rate_limit.requests, "per_seconds": msg.rate_limit.per_seconds}
    if msg.requires_approval:
        fields["requires_approval"] = True
    if msg.cacheable_seconds:
        fields["cacheable_seconds"] = msg.cacheable_seconds
    return parse_tool_spec(fields)


def tool_to_proto(tool: dict[str, Any]) -> tool_pb2.Tool:
    """The proto of a stored (or built-in) tool."""
    out = tool_pb2.Tool()
    _fields_to_proto(tool, out)
    if tool.get("created_at") is not None:
        out.created_at.CopyFrom(timestamp(tool["created_at"]))
    return out


# --- REST -------------------------------------------------------------------------------------------------


def _parameter_json(msg: tool_pb2.Parameter) -> dict[str, Any]:
    parameter = _parameter_from_proto(msg)
    parameter["required"] = msg.required
    return parameter


def tool_json(msg: tool_pb2.Tool) -> dict[str, Any]:
    """The REST form of a tool (the :class:`Tool` model)."""
    kind = enum_name(_TYPE, msg.type) or "custom"
    body: dict[str, Any] = {
        "tool_id": msg.tool_id,
        "type": kind,
        "name": msg.name,
        "description": msg.description,
        "input_schema": struct_to_dict(msg.input_schema),
    }
    if kind in ("builtin", "container"):
        if msg.credential:  # a container tool's declared credential: what a tenant's admin grants it
            body["credential"] = msg.credential
        return body
    if kind == "custom":
        if msg.parameters:
            body["parameters"] = [_parameter_json(p) for p in msg.parameters]
        body["endpoint"] = msg.endpoint
        body["method"] = (enum_name(_METHOD, msg.method) or "post").upper()
        body["auth"] = enum_name(_AUTH, msg.auth) or "none"
    if msg.credential:
        body["credential"] = msg.credential
    if msg.HasField("rate_limit"):
        body["rate_limit"] = {"requests": msg.rate_limit.requests, "per_seconds": msg.rate_limit.per_seconds}
    body["requires_approval"] = msg.requires_approval
    body["cacheable_seconds"] = msg.cacheable_seconds
    if msg.fallback_tool_id:
        body["fallback_tool_id"] = msg.fallback_tool_id
    if msg.HasField("created_at"):
        body["created_at"] = rfc3339(msg.created_at)
    return body
