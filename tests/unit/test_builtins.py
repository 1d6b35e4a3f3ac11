"""Built-in tools: their specs, and parse_email, json_extract and text_template."""

from __future__ import annotations

import json
import random
import re
from email.message import EmailMessage
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from altan.errors import InvalidArgument
from services.tool.builtin_email import MAX_EMAIL_CHARS
from services.tool.builtins import (
    BUILTIN_TOOLS,
    MAX_PATH_CHARS,
    MAX_TEMPLATE_CHARS,
    MAX_TEMPLATE_JSON_VALUES,
    MAX_TEMPLATE_PLACEHOLDERS,
    is_builtin,
    json_extract,
    parse_email,
    run_builtin,
    text_template,
)
from services.tool.schema import ArgumentValidator


def multipart_message() -> str:
    message = EmailMessage()
    message["Subject"] = "=?utf-8?q?Caf=C3=A9?= invoice"
    message["From"] = '"Doe, Alice" <alice@example.com>'
    message["To"] = "bob@example.com, Carol <carol@example.org>"
    message["Cc"] = "dan@example.net"
    message["Date"] = "Tue, 04 Mar 2025 10:15:00 +0100"
    message["Message-ID"] = "<abc.123@example.com>"
    message["Received"] = "from first.example"
    message["Received"] = "from second.example"
    message.set_content("Hello Bob,\nthe invoice is attached.\n")
    message.add_alternative("<p>Hello <b>Bob</b></p>", subtype="html")
    message.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="invoice.pdf")
    message.add_attachment("a,b\n1,2\n", subtype="csv", filename="rows.csv")
    return message.as_string()


# --- specs ------------------------------------------------------------------------------------------------


def test_every_spec_is_a_valid_closed_object_schema() -> None:
    assert set(BUILTIN_TOOLS) == {"http_request", "parse_email", "json_extract", "text_template"}
    for tool_id, spec in BUILTIN_TOOLS.items():
        assert spec["tool_id"] == tool_id
        assert spec["type"] == "builtin"
        assert spec["name"] and spec["description"]
        Draft202012Validator.check_schema(spec["input_schema"])
        assert spec["input_schema"]["type"] == "object"
        assert spec["input_schema"]["additionalProperties"] is False


def test_http_request_schema() -> None:
    schema = BUILTIN_TOOLS["http_request"]["input_schema"]
    validator = ArgumentValidator()
    validator.validate(
        "http_request",
        schema,
        {"url": "https://example.com", "method": "POST", "headers": {"X-A": "1"}, "json": [1], "credential": "c"},
    )
    assert schema["properties"]["method"]["enum"] == ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    assert schema["properties"]["method"]["default"] == "GET"
    for bad in ({}, {"url": "x", "method": "TRACE"}, {"url": "x", "headers": {"X": 1}}, {"url": "x", "extra": 1}):
        with pytest.raises(InvalidArgument):
            validator.validate("http_request", schema, bad)


def test_is_builtin() -> None:
    assert is_builtin("parse_email")
    assert is_builtin("http_request")
    assert not is_builtin("slack_notify")


async def test_run_builtin_dispatches_and_validates() -> None:
    assert await run_builtin("json_extract", {"data": {"a": 1}, "path": "a"}) == {"value": 1, "found": True}
    assert await run_builtin("text_template", {"template": "hi {{ n }}", "values": {"n": "x"}}) == {"text": "hi x"}
    assert (await run_builtin("parse_email", {"raw": multipart_message()}))["from"] == "alice@example.com"
    with pytest.raises(InvalidArgument, match="'path' is a required property"):
        await run_builtin("json_extract", {"data": {}})
    with pytest.raises(InvalidArgument, match="not run in-process"):
        await run_builtin("http_request", {"url": "https://example.com"})
    with pytest.raises(InvalidArgument, match="not a built-in tool"):
        await run_builtin("slack_notify", {})


# --- parse_email ------------------------------------------------------------------------------------------


def test_parse_email_multipart_with_attachments() -> None:
    parsed = parse_email(multipart_message())
    assert parsed["subject"] == "Café invoice"
    assert parsed["from"] == "alice@example.com"
    assert parsed["from_name"] == "Doe, Alice"
    assert parsed["to"] == ["bob@example.com", "carol@example.org"]
    assert parsed["cc"] == ["dan@example.net"]
    assert parsed["date"] == "2025-03-04T10:15:00+01:00"
    assert parsed["message_id"] == "<abc.123@example.com>"
    assert parsed["text"] == "Hello Bob,\nthe invoice is attached.\n"
    assert parsed["attachments"] == [
        {"filename": "invoice.pdf", "content_type": "application/pdf", "size": 13},
        {"filename": "rows.csv", "content_type": "text/csv", "size": 8},
    ]
    assert parsed["headers"]["subject"] == "Café invoice"
    assert parsed["headers"]["received"] == "from first.example"
    assert parsed["headers"]["content-type"].startswith("multipart/mixed")
    json.dumps(parsed)  # everything in it is JSON


def test_parse_email_falls_back_to_html_text() -> None:
    raw = (
        "From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        "<html><head><style>p {color: red}</style></head><body><p>Hello &amp; welcome</p>"
        "<script>alert(1)</script><p>Line   two</p></body></html>"
    )
    parsed = parse_email(raw)
    assert parsed["text"] == "Hello & welcome\nLine two"
    assert parsed["attachments"] == []


def test_parse_email_plain_message_without_optional_headers() -> None:
    parsed = parse_email("Subject: note\n\njust text")
    assert parsed == {
        "subject": "note",
        "from": None,
        "from_name": None,
        "to": [],
        "cc": [],
        "date": None,
        "message_id": None,
        "headers": {"subject": "note"},
        "text": "just text",
        "attachments": [],
    }


def test_parse_email_tolerates_a_bad_date_and_bad_addresses() -> None:
    parsed = parse_email("From: <<<@@@\nTo: ,,,@\nDate: the day after tomorrow\n\nbody")
    assert parsed["date"] is None
    assert parsed["from"] is None
    assert parsed["to"] == []
    assert parsed["text"] == "body"


def test_parse_email_unknown_charset_still_gives_text() -> None:
    raw = 'Content-Type: multipart/mixed; boundary="x"\n\n--x\nContent-Type: text/plain; charset=no-such\n\nhi\n--x--\n'
    assert parse_email(raw)["text"].strip() == "hi"


@pytest.mark.parametrize("raw", ["", "garbage", "\x00\x01\x02", "no header here\n\nbody", "\n\n\n"])
def test_parse_email_refuses_garbage(raw: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^raw: "):
        parse_email(raw)


def test_parse_email_refuses_non_strings() -> None:
    with pytest.raises(InvalidArgument, match="raw: must be a string"):
        parse_email(b"Subject: x\n\n")  # type: ignore[arg-type]


def test_parse_email_mangled_messages_raise_only_invalid_argument() -> None:
    source = multipart_message()
    alphabet = '<>@,;:"\\()[]=?\n\r\t -_aZ09=/.\x00\udcff\u00e9'
    rng = random.Random(7)
    for _ in range(800):
        chars = list(source)
        for _ in range(rng.randint(1, 25)):
            position = rng.randrange(len(chars))
            if rng.random() < 0.5:
                chars.insert(position, rng.choice(alphabet))
            else:
                chars[position] = rng.choice(alphabet)
        try:
            json.dumps(parse_email("".join(chars)))
        except InvalidArgument:
            pass


# --- json_extract -----------------------------------------------------------------------------------------

DATA = {"a": {"b": [{"c": 1}, {"c": None}], "dotted.key": "d", "0": "zero"}, "list": [10, 20, 30]}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("a.b[0].c", 1),
        ("$.a.b[0].c", 1),
        ("$.a.b[1].c", None),
        ("a.b.0.c", 1),
        ("list[-1]", 30),
        ("list.2", 30),
        ('a["dotted.key"]', "d"),
        ("$['a']['dotted.key']", "d"),
        ("a[0]", "zero"),
        ("$", DATA),
        ("", DATA),
        ("$.a.b", [{"c": 1}, {"c": None}]),
    ],
)
def test_json_extract_finds_values(path: str, value: Any) -> None:
    assert json_extract(DATA, path) == {"value": value, "found": True}


@pytest.mark.parametrize("path", ["a.x", "a.b[2]", "list[3]", "list.x", "a.b[0].c.d", "list[-4]", "missing[0]"])
def test_json_extract_missing_paths_are_not_found(path: str) -> None:
    assert json_extract(DATA, path) == {"value": None, "found": False}


@pytest.mark.parametrize("path", ["a..b", "a[x]", "a[", "a.[0]", "a[0", "a.b]"])
def test_json_extract_unreadable_paths_are_invalid(path: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^path: cannot read"):
        json_extract(DATA, path)


def test_json_extract_on_scalars_and_lists() -> None:
    assert json_extract([1, [2, 3]], "[1][0]") == {"value": 2, "found": True}
    assert json_extract("text", "$") == {"value": "text", "found": True}
    assert json_extract("text", "a") == {"value": None, "found": False}


# --- text_template ----------------------------------------------------------------------------------------


def test_text_template_fills_placeholders() -> None:
    values = {"name": "Ada", "n": 3, "user": {"tags": ["x", "y"], "ok": True, "none": None}, "obj": {"k": "é"}}
    template = "Hi {{name}}, {{ n }} new; tag {{ user.tags.1 }}; {{user.ok}} {{ user.none }} {{obj}} {{ user.tags }}"
    assert text_template(template, values) == {"text": 'Hi Ada, 3 new; tag y; true null {"k": "é"} ["x", "y"]'}


def test_text_template_does_not_expand_inserted_text() -> None:
    assert text_template("{{ a }}", {"a": "{{ b }}", "b": "no"}) == {"text": "{{ b }}"}


def test_text_template_without_placeholders() -> None:
    assert text_template("plain { text }", {}) == {"text": "plain { text }"}


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ missing }}", "values: no value for {{ missing }}"),
        ("{{ user.nope }}", "values: no value for {{ user.nope }}"),
        ("{{ user.name.first }}", "values: no value"),
        ("{{ user.__class__ }}", "values: no value"),
        ("{{ }}", "template: invalid placeholder"),
        ("{{ user['name'] }}", "template: invalid placeholder"),
        ("{{ user.name() }}", "template: invalid placeholder"),
        ("{{ 1 + 1 }}", "template: invalid placeholder"),
    ],
)
def test_text_template_refusals(template: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        text_template(template, {"user": {"name": "Ada"}})
    assert caught.value.message.startswith(message)


def test_text_template_output_is_bounded() -> None:
    with pytest.raises(InvalidArgument, match="longer than"):
        text_template("{{ a }}" * 2000, {"a": "x" * 1000})


def test_text_template_unclosed_braces_are_cheap() -> None:
    template = "{{" + "a" * 90_000 + "{{" * 1_000
    assert text_template(template, {}) == {"text": template}


# --- bounds: no call takes more than about 50 ms of CPU ----------------------------------------------------


def header_message(headers: list[tuple[str, str]], body: str = "x") -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n" + body


HOSTILE_EMAILS = {
    # Each took from a quarter of a second to a minute of CPU before (measured), holding the GIL.
    "64 kB of addresses": header_message([("To", ", ".join(f"u{i} <u{i}@e.com>" for i in range(4_000)))]),
    "8 kB of MIME parameters": header_message([("Content-Type", "text/plain; " + "p=v; " * 1_600)]),
    "64 kB of encoded words": header_message([("Subject", "=?utf-8?q?caf=C3=A9?= " * 3_000)]),
    "6,500 header fields": header_message([(f"X-H{i}", "v") for i in range(6_500)]),
    "600 MIME parts": "Content-Type: multipart/mixed; boundary=b\n\n"
    + "".join(f"--b\nContent-Type: text/plain; name=p{i}\n\nx\n" for i in range(600))
    + "--b--\n",
    "256 kB of dense HTML": header_message([("Content-Type", "text/html")], "<p><b>x</b></p>\n" * 16_000),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(HOSTILE_EMAILS))
def test_parse_email_refuses_messages_too_costly_to_parse(name: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^raw: too costly to parse"):
        parse_email(HOSTILE_EMAILS[name])


@pytest.mark.timeout(30)
def test_parse_email_still_parses_large_ordinary_messages() -> None:
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = ", ".join(f"Person {i} <p{i}@example.com>" for i in range(30))
    message["Subject"] = "big"
    message.set_content("Some text of a line, as people write them.\n" * 3_000)
    message.add_attachment(b"%PDF" * 60_000, maintype="application", subtype="pdf", filename="big.pdf")
    raw = message.as_string()
    assert 300_000 < len(raw) <= MAX_EMAIL_CHARS
    parsed = parse_email(raw)
    assert parsed["attachments"] == [{"filename": "big.pdf", "content_type": "application/pdf", "size": 240_000}]
    with pytest.raises(InvalidArgument, match=f"^raw: longer than {MAX_EMAIL_CHARS} characters"):
        parse_email(raw + "x" * MAX_EMAIL_CHARS)


def test_the_caps_are_in_the_specs() -> None:
    properties = {tool_id: spec["input_schema"]["properties"] for tool_id, spec in BUILTIN_TOOLS.items()}
    assert properties["parse_email"]["raw"]["maxLength"] == MAX_EMAIL_CHARS
    assert properties["json_extract"]["path"]["maxLength"] == MAX_PATH_CHARS
    assert properties["text_template"]["template"]["maxLength"] == MAX_TEMPLATE_CHARS


async def test_arguments_over_a_cap_are_refused_before_the_work() -> None:
    with pytest.raises(InvalidArgument, match=r"^arguments\.raw: 'xxx.*xxx' is too long$"):
        await run_builtin("parse_email", {"raw": "x" * (MAX_EMAIL_CHARS + 1)})
    with pytest.raises(InvalidArgument, match=r"^arguments\.path: .* is too long$"):
        await run_builtin("json_extract", {"data": {}, "path": "a." * MAX_PATH_CHARS})


def test_json_extract_and_text_template_take_huge_indexes_as_missing() -> None:
    # int() refuses 4,300 digits: a ValueError, a 500, before.
    assert json_extract([1], "[" + "9" * 990 + "]") == {"value": None, "found": False}
    with pytest.raises(InvalidArgument, match="no value for"):
        text_template("{{ a." + "9" * 5_000 + " }}", {"a": [1]})


@pytest.mark.parametrize(
    ("template", "values", "message"),
    [
        ("x" * (MAX_TEMPLATE_CHARS + 1), {}, "template: longer than"),
        ("{{ a }}" * (MAX_TEMPLATE_PLACEHOLDERS + 1), {"a": "x"}, "template: more than 2000 placeholders"),
        ("{{ a }}", {"a": list(range(MAX_TEMPLATE_JSON_VALUES))}, "values: a is too large to write as JSON"),
        ("{{ a }}{{ b }}", {"a": [0] * 30_000, "b": [1] * 30_000}, "values: b is too large to write as JSON"),
    ],
)
def test_text_template_bounds(template: str, values: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{re.escape(message)}"):
        text_template(template, values)


@pytest.mark.timeout(30)
def test_a_value_named_by_many_placeholders_is_written_once() -> None:
    rows = [{"id": i} for i in range(20)]
    text = text_template("{{ rows }}\n" * MAX_TEMPLATE_PLACEHOLDERS, {"rows": rows})["text"]
    assert text.count('{"id": 19}') == MAX_TEMPLATE_PLACEHOLDERS
