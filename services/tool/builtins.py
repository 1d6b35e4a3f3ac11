"""Built-in tools every tenant has: their specs, and the implementations of the pure ones.

``http_request`` is only a spec here: the tool executor runs it, through the egress guard. ``parse_email``,
``json_extract`` and ``text_template`` run in-process and touch nothing outside their arguments.
Treat the specs in :data:`BUILTIN_TOOLS` as read-only: they are shared by every tenant.

Each in-process call takes at most about 50 ms of CPU whatever its arguments (``bench/tenant_input.py builtins``):
the service's other requests wait meanwhile, in a worker thread too, which holds the GIL. The caps that ensure it
are in the specs (``maxLength``), so that an LLM and the OpenAPI see them; what a length cannot bound is refused
with a 400 as it is found (parse_email's budget of work, text_template's placeholders and JSON values).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from altan.errors import InvalidArgument
from altan.wire import count_json_values
from services.tool.builtin_email import MAX_EMAIL_CHARS, parse_email
from services.tool.schema import ArgumentValidator

__all__ = ["BUILTIN_TOOLS", "is_builtin", "json_extract", "parse_email", "run_builtin", "text_template"]

MAX_PATH_CHARS = 1000
MAX_TEMPLATE_CHARS = 100_000
MAX_TEMPLATE_PLACEHOLDERS = 2000  # ~10 us each with a long name: 20 ms
MAX_TEMPLATE_JSON_VALUES = 50_000  # inserted as JSON, in all: counting and dumping them, ~25 ms
MAX_TEMPLATE_OUTPUT_CHARS = 1_000_000


def _spec(tool_id: str, name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"tool_id": tool_id, "name": name, "description": description, "type": "builtin", "input_schema": schema}


BUILTIN_TOOLS: dict[str, dict[str, Any]] = {
    spec["tool_id"]: spec
    for spec in (
        _spec(
            "http_request",
            "HTTP request",
            "Send an HTTP request to a public URL and return the response body (parsed when it is JSON) and status.",
            {
                "url": {"type": "string", "description": "Absolute http or https URL."},
                "method": {
                    "type": "string",
                    "enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"],
                    "default": "GET",
                },
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "query": {"type": "object", "description": "Query string parameters."},
                "json": {"description": "Any JSON value, sent as the JSON request body."},
                "body": {"type": "string", "description": "Raw request body (instead of json)."},
                "credential": {"type": "string", "description": "Name of a stored credential to authenticate with."},
            },
            ["url"],
        ),
        _spec(
            "parse_email",
            "Parse email",
            "Parse an RFC 5322 email message into subject, sender, recipients, date, headers, text and attachments.",
            {
                "raw": {
                    "type": "string",
                    "maxLength": MAX_EMAIL_CHARS,
                    "description": "The whole message, headers and body. Messages too costly to parse are refused "
                    "(very long address or MIME header fields, hundreds of MIME parts, very dense HTML).",
                }
            },
            ["raw"],
        ),
        _spec(
            "json_extract",
            "Extract from JSON",
            'Read one value out of JSON data by a path such as "a.b[0].c" or "$.a.b[0]". '
            "Answers {value, found}; found is false (and value null) when the path does not exist.",
            {
                "data": {"description": "Any JSON value."},
                "path": {
                    "type": "string",
                    "maxLength": MAX_PATH_CHARS,
                    "description": 'Dot keys and [index] items, optionally after "$".',
                },
            },
            ["data", "path"],
        ),
        _spec(
            "text_template",
            "Fill text template",
            "Replace {{ name }} and {{ a.b }} placeholders in a template with values; non-strings become JSON.",
            {
                "template": {
                    "type": "string",
                    "maxLength": MAX_TEMPLATE_CHARS,
                    "description": f"At most {MAX_TEMPLATE_PLACEHOLDERS} placeholders; the text made of it at most "
                    f"{MAX_TEMPLATE_OUTPUT_CHARS} characters.",
                },
                "values": {
                    "type": "object",
                    "description": f"Values the placeholders name (non-strings at most {MAX_TEMPLATE_JSON_VALUES} "
                    "JSON values in all).",
                },
            },
            ["template", "values"],
        ),
    )
}


def is_builtin(tool_id: str) -> bool:
    """Whether ``tool_id`` names a built-in tool."""
    return tool_id in BUILTIN_TOOLS


_validator = ArgumentValidator()
_CPU_BOUND = frozenset({"parse_email"})


async def run_builtin(tool_id: str, arguments: dict[str, Any]) -> Any:
    """Run one of the in-process built-in tools after checking its arguments against its schema."""
    implementation = _IMPLEMENTATIONS.get(tool_id)
    if implementation is None:
        if tool_id in BUILTIN_TOOLS:
            raise InvalidArgument(f"tool {tool_id!r} is not run in-process; the tool executor runs it")
        raise InvalidArgument(f"tool {tool_id!r} is not a built-in tool")
    _validator.validate(tool_id, BUILTIN_TOOLS[tool_id]["input_schema"], arguments)
    if tool_id in _CPU_BOUND:
        # Parsing a large message is CPU work; a worker thread keeps the event loop answering meanwhile.
        return await asyncio.to_thread(implementation, arguments)
    return implementation(arguments)  # microseconds: a thread hop would cost more than the work


# --- json_extract -----------------------------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"\.([^.\[\]]+)|\[(-?\d+)\]|\[\"((?:[^\"\\]|\\.)*)\"\]|\['((?:[^'\\]|\\.)*)'\]")


def json_extract(data: Any, path: str) -> dict[str, Any]:
    """``{"value": ..., "found": true}``, or ``{"value": null, "found": false}`` when the path does not exist.

    A missing path is an answer, not an error, so that a plan can branch on ``found``; a path that cannot be
    read at all is an InvalidArgument.
    """
    found, value = _walk(data, _parse_path(path))
    return {"value": value if found else None, "found": found}


def _parse_path(path: str) -> list[str | int]:
    if not isinstance(path, str):
        raise InvalidArgument("path: must be a string")
    if len(path) > MAX_PATH_CHARS:
        raise InvalidArgument(f"path: longer than {MAX_PATH_CHARS} characters")
    rest = path.strip().removeprefix("$")
    if rest and not rest.startswith((".", "[")):
        rest = "." + rest
    segments: list[str | int] = []
    position = 0
    while position < len(rest):
        match = _PATH_TOKEN.match(rest, position)
        if match is None:
            raise InvalidArgument(f"path: cannot read {path!r} from {rest[position:]!r}")
        key, index, double_quoted, single_quoted = match.groups()
        if index is not None:
            segments.append(int(index))
        else:
            quoted = double_quoted if double_quoted is not None else single_quoted
            segments.append(key if quoted is None else re.sub(r"\\(.)", r"\1", quoted))
        position = match.end()
    return segments


def _walk(data: Any, segments: Sequence[str | int]) -> tuple[bool, Any]:
    current = data
    for segment in segments:
        if isinstance(current, dict):
            key = str(segment)
            if key not in current:
                return False, None
            current = current[key]
        elif isinstance(current, list):
            if isinstance(segment, str):
                if not re.fullmatch(r"-?\d{1,18}", segment):  # longer is no index (and int() refuses 4,300 digits)
                    return False, None
                segment = int(segment)
            if not -len(current) <= segment < len(current):
                return False, None
            current = current[segment]
        else:
            return False, None
    return True, current


# --- text_template ----------------------------------------------------------------------------------------

# No braces inside a placeholder: an unclosed "{{" then costs one scan to the next brace, not to the end.
_TEMPLATE_PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")


def text_template(template: str, values: dict[str, Any]) -> dict[str, str]:
    """``{"text": ...}``: each ``{{ name }}`` or ``{{ a.b.0 }}`` replaced by the value it names.

    Lookups are plain dict keys and list indexes, nothing else; strings go in as they are, other values as JSON.
    Bounded (400 past a bound): :data:`MAX_TEMPLATE_CHARS` of template, :data:`MAX_TEMPLATE_PLACEHOLDERS`
    placeholders, :data:`MAX_TEMPLATE_JSON_VALUES` JSON values inserted as JSON in all (each value counted and
    dumped once), :data:`MAX_TEMPLATE_OUTPUT_CHARS` of text.
    """
    if not isinstance(template, str):
        raise InvalidArgument("template: must be a string")
    if not isinstance(values, dict):
        raise InvalidArgument("values: must be an object")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidArgument(f"template: longer than {MAX_TEMPLATE_CHARS} characters")
    if template.count("{{") > MAX_TEMPLATE_PLACEHOLDERS:
        raise InvalidArgument(f'template: more than {MAX_TEMPLATE_PLACEHOLDERS} placeholders ("{{{{")')
    budget = [MAX_TEMPLATE_OUTPUT_CHARS - len(template)]
    json_values = [MAX_TEMPLATE_JSON_VALUES]
    dumped: dict[int, str] = {}  # by id: a value named by many placeholders is dumped once

    def as_json(name: str, value: Any) -> str:
        if id(value) not in dumped:
            counted = count_json_values(value, json_values[0])
            if counted is None:
                raise InvalidArgument(
                    f"values: {name} is too large to write as JSON (more than {MAX_TEMPLATE_JSON_VALUES} JSON values "
                    "written in all)"
                )
            json_values[0] -= counted
            dumped[id(value)] = json.dumps(value, ensure_ascii=False)
        return dumped[id(value)]

    def fill(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if not _TEMPLATE_NAME.fullmatch(name):
            raise InvalidArgument(f"template: invalid placeholder {match.group(0)!r}")
        found, value = _walk(values, name.split("."))
        if not found:
            raise InvalidArgument(f"values: no value for {{{{ {name} }}}}")
        text = value if isinstance(value, str) else as_json(name, value)
        budget[0] -= len(text)
        if budget[0] < 0:
            raise InvalidArgument(f"template: the text would be longer than {MAX_TEMPLATE_OUTPUT_CHARS} characters")
        return text

    return {"text": _TEMPLATE_PLACEHOLDER.sub(fill, template)}


_IMPLEMENTATIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "parse_email": lambda args: parse_email(args["raw"]),
    "json_extract": lambda args: json_extract(args["data"], args["path"]),
    "text_template": lambda args: text_template(args["template"], args["values"]),
}
