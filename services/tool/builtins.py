"""Built-in tools every tenant has: their specs, and the implementations of the pure ones.

``http_request`` is only a spec here: the tool executor runs it, through the egress guard. ``parse_email``,
``json_extract`` and ``text_template`` run in-process and touch nothing outside their arguments.
Treat the specs in :data:`BUILTIN_TOOLS` as read-only: they are shared by every tenant.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import json
import re
from collections.abc import Callable, Sequence
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from typing import Any

from altan.errors import InvalidArgument
from services.tool.schema import ArgumentValidator

__all__ = ["BUILTIN_TOOLS", "is_builtin", "json_extract", "parse_email", "run_builtin", "text_template"]

MAX_EMAIL_CHARS = 10_000_000
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
            {"raw": {"type": "string", "description": "The whole message, headers and body."}},
            ["raw"],
        ),
        _spec(
            "json_extract",
            "Extract from JSON",
            'Read one value out of JSON data by a path such as "a.b[0].c" or "$.a.b[0]". '
            "Answers {value, found}; found is false (and value null) when the path does not exist.",
            {
                "data": {"description": "Any JSON value."},
                "path": {"type": "string", "description": 'Dot keys and [index] items, optionally after "$".'},
            },
            ["data", "path"],
        ),
        _spec(
            "text_template",
            "Fill text template",
            "Replace {{ name }} and {{ a.b }} placeholders in a template with values; non-strings become JSON.",
            {
                "template": {"type": "string"},
                "values": {"type": "object", "description": "Values the placeholders name."},
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


# --- parse_email ------------------------------------------------------------------------------------------


def parse_email(raw: str) -> dict[str, Any]:
    """The parts of an RFC 5322 message a plan usually needs. Malformed input raises only InvalidArgument."""
    if not isinstance(raw, str):
        raise InvalidArgument("raw: must be a string")
    if len(raw) > MAX_EMAIL_CHARS:
        raise InvalidArgument(f"raw: longer than {MAX_EMAIL_CHARS} characters")
    try:
        message = email.message_from_string(raw, policy=email.policy.default)
        if not message.keys():
            raise InvalidArgument("raw: not an RFC 5322 message (no header fields)")
        return _email_fields(message)
    except InvalidArgument:
        raise
    except Exception as exc:
        # The email package has many ways to trip over hostile input (header parser errors, bad encodings);
        # none of them is our fault, so all of them are the caller's malformed message.
        raise InvalidArgument(f"raw: malformed message ({type(exc).__name__})") from exc


def _email_fields(message: Message) -> dict[str, Any]:
    senders = _addresses(message, "from")
    body_parts: list[Message] = []
    text = ""
    if isinstance(message, EmailMessage):
        plain, html = message.get_body(preferencelist=("plain",)), message.get_body(preferencelist=("html",))
        body_parts = [part for part in (plain, html) if part is not None]
        if plain is not None:
            text = _part_text(plain)
        elif html is not None:
            text = _html_to_text(_part_text(html))
    return {
        "subject": str(message.get("subject", "")),
        "from": senders[0][1] if senders else None,
        "from_name": senders[0][0] if senders else None,
        "to": [address for _, address in _addresses(message, "to")],
        "cc": [address for _, address in _addresses(message, "cc")],
        "date": _date(message),
        "message_id": str(message.get("message-id", "")).strip() or None,
        "headers": _headers(message),
        "text": text,
        "attachments": _attachments(message, body_parts),
    }


def _headers(message: Message) -> dict[str, str]:
    # Lower-case names, first occurrence wins: predictable for ${s1.output.headers.x-mailer} references.
    headers: dict[str, str] = {}
    for name, value in message.items():
        headers.setdefault(name.lower(), str(value))
    return headers


def _addresses(message: Message, header: str) -> list[tuple[str, str]]:
    values = [str(value) for value in message.get_all(header, [])]
    return [(name, address) for name, address in email.utils.getaddresses(values) if address]


def _date(message: Message) -> str | None:
    value = message.get("date")
    if value is None:
        return None
    try:
        return email.utils.parsedate_to_datetime(str(value)).isoformat()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _part_text(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except (LookupError, UnicodeError):  # an unknown or lying charset
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else ""
    return content if isinstance(content, str) else ""


def _attachments(message: Message, body_parts: list[Message]) -> list[dict[str, Any]]:
    attachments = []
    for part in message.walk():
        if part.is_multipart() or any(part is body for body in body_parts):
            continue
        filename = part.get_filename()
        if filename is None and part.get_content_disposition() != "attachment":
            continue
        payload = part.get_payload(decode=True)
        attachments.append(
            {
                "filename": filename,
                "content_type": part.get_content_type(),
                "size": len(payload) if isinstance(payload, bytes) else 0,
            }
        )
    return attachments


class _TextExtractor(HTMLParser):
    _SKIPPED = frozenset({"script", "style", "head", "title"})
    _BREAKS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIPPED:
            self._skipping += 1
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED and self._skipping:
            self._skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.chunks.append(data)


def _html_to_text(html: str) -> str:
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    lines = (" ".join(line.split()) for line in "".join(extractor.chunks).splitlines())
    return "\n".join(line for line in lines if line)


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
                if not re.fullmatch(r"-?\d+", segment):
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
    """
    if not isinstance(template, str):
        raise InvalidArgument("template: must be a string")
    if not isinstance(values, dict):
        raise InvalidArgument("values: must be an object")
    budget = [MAX_TEMPLATE_OUTPUT_CHARS - len(template)]

    def fill(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if not _TEMPLATE_NAME.fullmatch(name):
            raise InvalidArgument(f"template: invalid placeholder {match.group(0)!r}")
        found, value = _walk(values, name.split("."))
        if not found:
            raise InvalidArgument(f"values: no value for {{{{ {name} }}}}")
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
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
