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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/tenant_input.py` from anywhere

import re2

from altan.errors import InvalidArgument
from services.tool import argument_budget, schema_bounds
from services.tool import bounded_validation as bv
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
            "properties: 400 entries, 1 matches",
            obj({"a": {"type": "array", "items": obj({f"p{i}": {"type": "string"} for i in range(400)})}}),
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


def main() -> None:
    parts = {"validation": validation, "budgeted": budgeted, "creation": creation}
    for part in sys.argv[1:] or list(parts):
        parts[part]()


if __name__ == "__main__":
    main()
