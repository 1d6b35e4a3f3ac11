"""The ``parse_email`` built-in: the parts of an RFC 5322 message a plan usually needs, within a budget of work.

Python's email package is slow on hostile input, and slower than linear: it parses a structured header field
(addresses, MIME parameters) at 6-10 µs a byte, and again at every access (a 2 KB Content-Type cost 220 ms
through parse_email); nested multiparts cost ~1.5 ms a level, short lines ~0.7 µs each. It runs in a worker
thread, but holds the GIL: every other request of the tool service waited meanwhile. So a message is parsed
within :data:`PARSE_BUDGET` units of :mod:`~services.tool.argument_budget` (about 50 ms of CPU; measured by
``python bench/tenant_input.py builtins``), past which it is refused with a 400:

- its lines (those of header sections cost three times more), characters and possible MIME boundaries are
  paid for before it is parsed;
- each header field is parsed once (:class:`_ParsedOnce`), and paid for by its length and kind first;
- addresses, and HTML turned into text, are paid for by their length (and tags) first.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.headerregistry import (
    AddressHeader,
    ContentTransferEncodingHeader,
    HeaderRegistry,
    MIMEVersionHeader,
    ParameterizedMIMEHeader,
)
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from typing import Any

from altan.errors import InvalidArgument
from services.tool.argument_budget import OverBudget, budget, spend

__all__ = ["MAX_EMAIL_CHARS", "PARSE_BUDGET", "parse_email"]

MAX_EMAIL_CHARS = 512 * 1024
PARSE_BUDGET = 50_000
# Prices, in units of about a microsecond (bench/tenant_input.py builtins).
_LINE = 1  # the parser's work per line
_PART_LINE = 2  # the same with MIME boundaries about, when each line is matched against them
_FIELD_LINE = 4  # more for a line of a header section: the parser's work on those is three times a body line's
_FIELD_LOOKUP = 1  # a header field of a part, for each lookup by name (a scan of them all) of the dozen made
_CHARS_PER_UNIT = 50  # per character: splitting, decoding transfer encodings and charsets
_BOUNDARY = 150  # a line that may start a MIME part (a part, or a level of nesting)
_FIELD = 30  # a header field parsed, besides its characters
_STRUCTURED_CHAR = 12  # a character of an address or MIME header field (the email package's slowest)
_UNSTRUCTURED_CHAR = 2  # a character of any other header field (encoded words decoded)
_ADDRESS_CHAR = 2  # a character of addresses split by email.utils.getaddresses
_TAG = 10  # an HTML tag turned into text

_STRUCTURED = frozenset(
    name
    for name, kind in HeaderRegistry().registry.items()
    if issubclass(kind, AddressHeader | ParameterizedMIMEHeader | MIMEVersionHeader | ContentTransferEncodingHeader)
)


class _ParsedOnce(email.policy.EmailPolicy):
    """``email.policy.default``, each header field parsed once per message and paid for before it is parsed.

    The email package parses a field again at every access: the Content-Type of a part, a dozen times.
    """

    parsed: dict[tuple[str, str], Any] | None = None  # this message's fields, parsed (one dict per message)

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)  # policies take their attributes as keywords, and are immutable afterwards

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if hasattr(value, "name") or self.parsed is None:  # already a parsed header
            return super().header_fetch_parse(name, value)
        key = (name, value)
        header = self.parsed.get(key)
        if header is None:
            per_char = _STRUCTURED_CHAR if name.lower() in _STRUCTURED else _UNSTRUCTURED_CHAR
            spend(_FIELD + len(value) * per_char)
            header = self.parsed[key] = super().header_fetch_parse(name, value)
        return header


def _header_lines(raw: str) -> int:
    """At most how many lines of header sections ``raw`` has: its own, and one after each possible boundary."""
    total, start = 0, 0
    while start != -1:
        ends = [end for end in (raw.find("\n\n", start), raw.find("\n\r\n", start)) if end != -1]
        total += raw.count("\n", start, min(ends, default=len(raw)))
        start = raw.find("\n--", start + 1)
    return total


def parse_email(raw: str) -> dict[str, Any]:
    """The parts of an RFC 5322 message a plan usually needs. Malformed input raises only InvalidArgument.

    Refused too (400): a message longer than :data:`MAX_EMAIL_CHARS`, or costlier to parse than
    :data:`PARSE_BUDGET` (long address or MIME header fields, many parts or levels of parts, dense HTML).
    """
    if not isinstance(raw, str):
        raise InvalidArgument("raw: must be a string")
    if len(raw) > MAX_EMAIL_CHARS:
        raise InvalidArgument(f"raw: longer than {MAX_EMAIL_CHARS} characters")
    try:
        with budget(PARSE_BUDGET):
            boundaries = raw.count("\n--")
            line = _PART_LINE if boundaries else _LINE
            spend(raw.count("\n") * line + boundaries * _BOUNDARY + len(raw) // _CHARS_PER_UNIT)
            spend(_header_lines(raw) * _FIELD_LINE)  # after the boundaries are paid for: it looks at each
            message = email.message_from_string(raw, policy=_ParsedOnce(parsed={}))
            if not message.keys():
                raise InvalidArgument("raw: not an RFC 5322 message (no header fields)")
            spend(sum(len(part) for part in message.walk()) * _FIELD_LOOKUP)
            return _email_fields(message)
    except InvalidArgument:
        raise
    except OverBudget:
        raise InvalidArgument(
            "raw: too costly to parse (long address or MIME header fields, many MIME parts, dense HTML or many "
            f"short lines; at most about {PARSE_BUDGET // 1000} ms of work)"
        ) from None
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
    spend(sum(len(value) for value in values) * _ADDRESS_CHAR)
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
    spend(html.count("<") * _TAG + len(html) // _CHARS_PER_UNIT)
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    lines = (" ".join(line.split()) for line in "".join(extractor.chunks).splitlines())
    return "\n".join(line for line in lines if line)
