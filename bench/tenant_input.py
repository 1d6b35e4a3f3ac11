"""What tenant input costs the tool service: ``python bench/tenant_input.py [validation|creation|builtins]``.

The numbers behind the bounds of ``services/tool/schema_bounds.py``, ``bounded_validation.py`` and the caps of
``builtins.py``. CPU time of this process (``time.process_time``), best of a few runs, so that other load on the
machine inflates the numbers as little as possible.

- ``validation``: for shapes of schema and arguments that stress one keyword each, the units the budget
  charges and the CPU they take: µs per unit should stay near or below 1 for every shape, so that the budget of
  50,000 units is about 50 ms at worst.
- ``creation``: the CPU of ``parse_custom_tool`` for the costliest schemas the bounds admit.
- ``builtins``: the CPU of ``parse_email``, ``json_extract`` and ``text_template`` at their input caps.
"""

from __future__ import annotations

import json
import random
import string
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/tenant_input.py` from anywhere

import re2

from altan.errors import InvalidArgument
from services.tool import argument_budget, schema_bounds
from services.tool import bounded_validation as bv
from services.tool.builtins import json_extract, parse_email, text_template
from services.tool.schema import parse_custom_tool
from services.tool.tenant_regex import compile_tenant_regex


def cpu(run: Callable[[], Any], repeat: int = 5) -> float:
    """Best CPU seconds of ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def tool(schema: dict[str, Any]) -> dict[str, Any]:
    return {"tool_id": "bench", "name": "Bench", "endpoint": "https://api.example/x", "input_schema": schema}


def obj(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **more}


def units_and_cpu(schema: dict[str, Any], arguments: Any) -> tuple[int, float]:
    """Units charged and CPU taken by one unbudgeted check (the budget set high enough never to stop it)."""
    compiled = bv.BoundedSchema(parse_custom_tool(tool(schema))["input_schema"])
    spent = [0]

    def check() -> None:
        with argument_budget.budget(10**15, compiled._comparisons) as budget:
            for _ in compiled.validator.iter_errors(arguments):
                pass
        spent[0] = 10**15 - budget.remaining

    check()
    seconds = cpu(check)
    return spent[0], seconds


def shapes() -> list[tuple[str, dict[str, Any], Any]]:
    rnd = random.Random(7)
    words = ["".join(rnd.choices(string.ascii_lowercase, k=8)) for _ in range(2000)]
    unicode_text = "".join(rnd.choice("abcdé ١Ж中_.") for _ in range(20_000))
    ab = "".join(rnd.choice("ab") for _ in range(20_000))
    big = {f"k{i}": [i, {"v": words[i % 2000]}] for i in range(3000)}
    annotated = {f"x-note-{i}": "n" for i in range(60)} | {"type": "string"}
    return [
        ("items: {}", obj({"a": {"type": "array", "items": {}}}), {"a": list(range(5000))}),
        ("items: true", obj({"a": {"type": "array", "items": True}}), {"a": list(range(20000))}),
        ("items: type", obj({"a": {"type": "array", "items": {"type": "string"}}}), {"a": words}),
        ("items: 60 annotations", obj({"a": {"type": "array", "items": annotated}}), {"a": words}),
        (
            "items: object, 2 properties",
            obj({"a": {"type": "array", "items": obj({"i": {"type": "integer"}, "s": {"type": "string"}})}}),
            {"a": [{"i": i, "s": w} for i, w in enumerate(words)]},
        ),
        (
            "properties: 280 entries, 1 matches",
            obj({"a": {"type": "array", "items": obj({f"p{i}": {"type": "string"} for i in range(280)})}}),
            {"a": [{"p1": "x"}] * 1000},
        ),
        (
            "items: $ref",
            obj({"a": {"type": "array", "items": {"$ref": "#/$defs/s"}}}, **{"$defs": {"s": {"type": "string"}}}),
            {"a": words},
        ),
        (
            "items: $ref to an $anchor in an $id",
            obj(
                {"a": {"type": "array", "items": {"$ref": "#/$defs/s"}}},
                **{"$defs": {"s": {"$id": "urn:s", "$ref": "#t", "$defs": {"t": {"$anchor": "t", "type": "string"}}}}},
            ),
            {"a": words},
        ),
        (
            "items: $dynamicRef",
            obj(
                {"a": {"type": "array", "items": {"$dynamicRef": "#s"}}},
                **{"$defs": {"s": {"$dynamicAnchor": "s", "type": "string"}}},
            ),
            {"a": words},
        ),
        (
            "items: anyOf, 10 failing",
            obj({"a": {"type": "array", "items": {"anyOf": [{"type": "integer"}] * 10}}}),
            {"a": words},
        ),
        (
            "items: oneOf, 10 passing",
            obj({"a": {"type": "array", "items": {"oneOf": [{"type": "string"}] * 10}}}),
            {"a": words[:500]},
        ),
        (
            "items: enum of 500",
            obj({"a": {"type": "array", "items": {"enum": words[:500]}}}),
            {"a": words[:1000]},
        ),
        (
            "items: const, 200-value object",
            obj({"a": {"type": "array", "items": {"const": {f"k{i}": i for i in range(200)}}}}),
            {"a": [{f"k{i}": i for i in range(200)}] * 200},
        ),
        ("uniqueItems: 3000 objects", obj({"a": {"uniqueItems": True}}), {"a": list(big.values())}),
        ("required: 500", obj({"a": {"type": "array", "items": {"required": words[:500]}}}), {"a": [{}] * 200}),
        (
            "patternProperties: 10 x 3000 keys",
            obj({"a": {"patternProperties": {f"^k{i}": {"type": "array"} for i in range(10)}}}),
            {"a": big},
        ),
        (
            "additionalProperties with patterns",
            obj({"a": {"patternProperties": {"^z": {}}, "additionalProperties": {"type": "array"}}}),
            {"a": big},
        ),
        (
            "unevaluatedProperties over allOf",
            obj({"a": {"allOf": [{"properties": {"k1": {}}}], "unevaluatedProperties": {"type": "array"}}}),
            {"a": big},
        ),
        (
            "unevaluatedItems over prefixItems",
            obj({"a": {"prefixItems": [{}], "unevaluatedItems": {"type": "string"}}}),
            {"a": words},
        ),
        ("contains", obj({"a": {"contains": {"const": "zzz"}}}), {"a": words}),
        ("propertyNames pattern", obj({"a": {"propertyNames": {"pattern": "^k[0-9]+$"}}}), {"a": big}),
        ("pattern [ab]*a[ab]{30}c, 20 kB", obj({"a": {"pattern": "[ab]*a[ab]{30}c"}}), {"a": ab}),
        ("pattern (\\w+\\s?)*$, 20 kB non-ASCII", obj({"a": {"pattern": "(\\w+\\s?)*$"}}), {"a": unicode_text}),
        ("maxProperties error on 3000 keys", obj({"a": {"maxProperties": 1}}), {"a": big}),
        ("anyOf of false on 3000 keys", obj({"a": {"anyOf": [False] * 20}}), {"a": big}),
        ("not: {} on 3000 keys", obj({"a": {"allOf": [{"not": {}}] * 20}}), {"a": big}),
    ]


def validation() -> None:
    print(f"{'shape':45s} {'units':>9s} {'CPU ms':>8s} {'µs/unit':>8s}")
    for name, schema, arguments in shapes():
        units, seconds = units_and_cpu(schema, arguments)
        print(f"{name:45s} {units:9d} {seconds * 1e3:8.1f} {seconds * 1e6 / max(units, 1):8.2f}")


def budgeted() -> None:
    """Each shape checked as the tool service checks it: within the budget (refused past it)."""
    print(f"{'shape (within the budget)':45s} {'CPU ms':>8s}  outcome")
    for name, schema, arguments in shapes():
        compiled = bv.BoundedSchema(parse_custom_tool(tool(schema))["input_schema"])
        outcome: list[str] = []

        def check(compiled: bv.BoundedSchema = compiled, arguments: Any = arguments, seen: list[str] = outcome) -> None:
            try:
                seen[:] = ["valid" if compiled.best_error(arguments) is None else "invalid"]
            except InvalidArgument:
                seen[:] = ["too costly"]

        print(f"{name:45s} {cpu(check) * 1e3:8.1f}  {outcome[0]}")


def costly_schemas() -> list[tuple[str, dict[str, Any]]]:
    """The costliest schemas of each kind that the bounds of schema_bounds.py still admit."""
    nodes = schema_bounds.MAX_SCHEMA_NODES
    ladder = {f"l{i}": {"allOf": [{"$ref": f"#/$defs/l{i + 1}"}, {"$ref": f"#/$defs/l{i + 1}"}]} for i in range(6)}
    ladder["l6"] = {"type": "string"}
    nested: dict[str, Any] = {"type": "string"}
    for _ in range(schema_bounds.MAX_SCHEMA_DEPTH // 2 - 1):
        nested = obj({"a": nested})
    # \w{5} is ~6,500 RE2 instructions: as many as the total allows.
    patterns = {f"p{i}": {"pattern": f"\\w{{5}}{i}"} for i in range(schema_bounds.MAX_TOTAL_PROGRAM // 6_600)}
    return [
        ("empty subschemas up to the node cap", obj({f"p{i}": {} for i in range(nodes - 3)})),
        ("typed subschemas up to the node cap", obj({f"p{i}": {"type": "string"} for i in range((nodes - 3) // 2)})),
        ("allOf of empty subschemas", obj({}, allOf=[{}] * (min(nodes, schema_bounds.MAX_IN_PLACE_COST) - 4))),
        (
            "anchored $refs",
            obj(
                {f"p{i}": {"$ref": f"#a{i}"} for i in range(nodes // 5)},
                **{"$defs": {f"d{i}": {"$anchor": f"a{i}"} for i in range(nodes // 5)}},
            ),
        ),
        ("an enum of strings", obj({"e": {"enum": [f"value-{i}" for i in range(nodes - 5)]}})),
        ("allOf/$ref ladder, 506 at one place", obj({"x": {"$ref": "#/$defs/l0"}}, **{"$defs": ladder})),
        ("nesting at the depth cap", nested),
        ("patterns up to the RE2 program cap", obj(patterns)),
    ]


def creation() -> None:
    print(f"{'schema (admitted)':45s} {'chars':>7s} {'CPU ms':>8s}")
    for name, schema in costly_schemas():
        body = tool(schema)

        def create(body: dict[str, Any] = body) -> None:
            compile_tenant_regex.cache_clear()  # the first tool with a pattern compiles it
            re2.purge()
            parse_custom_tool(body)

        print(f"{name:45s} {len(json.dumps(schema)):7d} {cpu(create) * 1e3:8.1f}")


def _message(headers: list[tuple[str, str]], body: str) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n" + body


def _realistic_email(body_chars: int) -> str:
    """A received message as a mail server hands it over: trace and signature fields, text, HTML, a PDF."""
    message = EmailMessage()
    for hop in range(6):
        message["Received"] = f"from mx{hop}.example (mx{hop}.example [192.0.2.{hop}]) by mx.example; Tue, 4 Mar 2025"
    message["DKIM-Signature"] = "v=1; a=rsa-sha256; d=example.com; s=s1; h=from:to:subject; b=" + "B" * 344
    message["From"] = '"Doe, Alice" <alice@example.com>'
    message["To"] = ", ".join(f"Person {i} <person{i}@example.com>" for i in range(30))
    message["Subject"] = "=?utf-8?q?Caf=C3=A9?= invoice"
    message["Date"] = "Tue, 04 Mar 2025 10:15:00 +0100"
    message.set_content("Hello Bob, the invoice is attached and the details follow.\n" * (body_chars // 60))
    message.add_alternative("<p>Hello <b>Bob</b>, the invoice is attached.</p>\n" * (body_chars // 50), subtype="html")
    message.add_attachment(b"%PDF" * (body_chars // 4), maintype="application", subtype="pdf", filename="invoice.pdf")
    return message.as_string()


def email_shapes() -> list[tuple[str, str]]:
    size = 64 * 1024
    nested, closing = "", ""
    for level in range(60):
        nested += f"Content-Type: multipart/mixed; boundary=b{level}\n\n--b{level}\n"
        closing = f"\n--b{level}--\n" + closing
    parts = "".join(f"--b\nContent-Type: text/plain; name=p{i}\n\nx\n" for i in range(600))
    return [
        ("realistic, 10 kB", _realistic_email(3_000)),
        ("realistic, 300 kB", _realistic_email(100_000)),
        ("realistic, 500 kB", _realistic_email(150_000)),
        ("plain text, 500 kB, 70-char lines", _message([("From", "a@b.c")], ("x" * 68 + "\r\n") * 7_400)),
        ("plain text, 64 kB, 2-char lines", _message([("From", "a@b.c")], "x\n" * (size // 2))),
        ("To: 64 kB of addresses", _message([("To", ", ".join(f"u{i} <u{i}@e.com>" for i in range(size // 16)))], "x")),
        ("Content-Type: 8 kB of parameters", _message([("Content-Type", "text/plain; " + "p=v; " * 1600)], "x")),
        ("64 kB of short header fields", _message([(f"X-H{i}", "v") for i in range(size // 10)], "x")),
        ("Subject: 64 kB of encoded words", _message([("Subject", "=?utf-8?q?caf=C3=A9?= " * (size // 21))], "x")),
        ("multipart nested 60 levels", "From: a@b.c\n" + nested + "Content-Type: text/plain\n\nx" + closing),
        ("multipart, 600 parts", "From: a@b.c\nContent-Type: multipart/mixed; boundary=b\n\n" + parts + "--b--\n"),
        ("HTML only, 256 kB of tags", _message([("Content-Type", "text/html")], "<p><b>x</b></p>\n" * 16_000)),
        (
            "HTML only, 200 kB of prose",
            _message([("Content-Type", "text/html")], ("<p>" + "word " * 200 + "</p>") * 200),
        ),
    ]


def builtins() -> None:
    print(f"{'parse_email input':45s} {'chars':>8s} {'CPU ms':>8s}  outcome")
    for name, raw in email_shapes():
        outcome: list[str] = []

        def parse(raw: str = raw, seen: list[str] = outcome) -> None:
            try:
                parse_email(raw)
                seen[:] = ["parsed"]
            except InvalidArgument as exc:
                seen[:] = [exc.message[:40]]

        print(f"{name:45s} {len(raw):8d} {cpu(parse) * 1e3:8.1f}  {outcome[0]}")
    big = {"rows": [{"id": i, "tags": ["a", "b"]} for i in range(30_000)]}
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("json_extract, 1 MB data, 1000-char path", lambda: json_extract(big, "rows[1].tags[0]" + ".x" * 490)),
        ("text_template, 2,000 deep placeholders", lambda: text_template("{{ a.b.c.d.e.f.g.h }}" * 2000, deep())),
        ("text_template, 100 kB of unclosed braces", lambda: text_template("{ " * 50_000, {})),
        ("text_template, a 1 MB value inserted twice", lambda: text_template("{{ rows }}{{ rows }}", big)),
        ("text_template, 2,000 placeholders of 1 MB", lambda: text_template("{{ s }}" * 2000, {"s": "x" * 1_000_000})),
    ]
    for name, run in cases:
        outcome = []

        def call(run: Callable[[], Any] = run, seen: list[str] = outcome) -> None:
            try:
                run()
                seen[:] = ["done"]
            except InvalidArgument as exc:
                seen[:] = [exc.message[:40]]

        print(f"{name:54s} {cpu(call) * 1e3:8.1f}  {outcome[0]}")


def deep() -> dict[str, Any]:
    return {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}


def main() -> None:
    parts = {"validation": validation, "budgeted": budgeted, "creation": creation, "builtins": builtins}
    for part in sys.argv[1:] or list(parts):
        parts[part]()


if __name__ == "__main__":
    main()
