"""Hostile input schemas are refused when the tool is created, naming the JSON path; what the bounds admit works."""

from __future__ import annotations

import json
from typing import Any

import pytest

from altan.errors import InvalidArgument
from services.tool.schema import ArgumentValidator, parse_custom_tool
from services.tool.schema_bounds import (
    MAX_IN_PLACE_COST,
    MAX_IN_PLACE_DEPTH,
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_KEYS,
    MAX_SCHEMA_NODES,
)


def tool(schema: dict[str, Any]) -> dict[str, Any]:
    return {"tool_id": "hostile", "name": "Hostile", "endpoint": "https://api.example/x", "input_schema": schema}


def created(schema: dict[str, Any]) -> dict[str, Any]:
    return parse_custom_tool(tool(schema))["input_schema"]


def refused(schema: Any) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse_custom_tool(tool(schema))
    return caught.value.message


def check(schema: dict[str, Any], arguments: Any) -> str | None:
    """The message of the 400 that ``arguments`` get, or None when they are valid."""
    try:
        ArgumentValidator().validate("hostile", schema, arguments)
    except InvalidArgument as exc:
        return exc.message
    return None


def obj(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **more}


def ladder(levels: int, *, each_item: bool = False) -> dict[str, Any]:
    """Each level references the next one twice: 2^levels evaluations at one place, in a few hundred bytes."""
    defs: dict[str, Any] = {
        f"l{i}": {"allOf": [{"$ref": f"#/$defs/l{i + 1}"}, {"$ref": f"#/$defs/l{i + 1}"}]} for i in range(levels)
    }
    defs[f"l{levels}"] = {"type": "string", "minLength": 1}
    top = {"$ref": "#/$defs/l0"}
    return obj({"x": {"type": "array", "items": top} if each_item else top}, **{"$defs": defs})


TREE = obj(
    {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
    required=["name"],
    additionalProperties=False,
)


# --- regular expressions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (
            obj({"x": {"type": "string", "pattern": "^(?=.*[0-9])"}}),
            "input_schema.properties.x.pattern: lookahead and lookbehind are not supported",
        ),
        (
            obj({"x": {"type": "string", "pattern": r"(?<!a)b"}}),
            "input_schema.properties.x.pattern: lookahead and lookbehind are not supported",
        ),
        (
            obj({}, patternProperties={r"^(a)\1$": {}}),
            "input_schema.patternProperties['^(a)\\\\1$']: backreferences are not supported",
        ),
        (
            obj({"x": {"propertyNames": {"pattern": "(?>a)"}}}),
            "input_schema.properties.x.propertyNames.pattern: atomic groups",
        ),
        (
            obj({"x": {"pattern": "(" * 40 + ")" * 40}}),
            "input_schema.properties.x.pattern: a pattern with groups nested deeper than 32 levels",
        ),
        (obj({"x": {"pattern": "x" * 1001}}), "input_schema.properties.x.pattern: a pattern longer than 1000"),
        (
            obj({f"p{i}": {"pattern": rf"\w{{9}}{i}"} for i in range(3)}),
            "input_schema.properties.p1.pattern: the schema's patterns are too complex together",
        ),
    ],
)
def test_patterns_re2_cannot_run_are_refused_naming_the_path(schema: dict[str, Any], message: str) -> None:
    assert refused(schema).startswith(message)


def test_a_format_regex_value_is_an_annotation_and_never_run() -> None:
    schema = created(obj({"x": {"type": "string", "format": "regex"}}))
    assert check(schema, {"x": "^(a+)+$"}) is None


def test_a_pattern_used_many_times_counts_once() -> None:
    created(obj({f"p{i}": {"type": "string", "pattern": r"^\w+$"} for i in range(100)}))


def test_a_pattern_in_parameters_is_refused_too() -> None:
    body = {**tool({}), "parameters": [{"name": "a", "type": "array", "items": {"pattern": "(?=a)"}}]}
    del body["input_schema"]
    with pytest.raises(InvalidArgument, match=r"^parameters\.properties\.a\.items\.pattern: lookahead"):
        parse_custom_tool(body)


# --- references and expansion ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        obj({}, **{"$ref": "#"}),
        obj({}, allOf=[{"$ref": "#"}]),
        obj({}, anyOf=[{"type": "object"}, {"not": {"$ref": "#"}}]),
        obj(
            {"a": {"$ref": "#/$defs/b"}},
            **{"$defs": {"b": {"$ref": "#/$defs/c"}, "c": {"oneOf": [{"$ref": "#/$defs/b"}]}}},
        ),
        obj({}, **{"$defs": {"a": {"$anchor": "a", "if": {"$ref": "#a"}}}}),
        obj({}, dependentSchemas={"x": {"$ref": "#"}}),
        obj({}, **{"$dynamicAnchor": "node", "allOf": [{"$dynamicRef": "#node"}]}),
    ],
)
def test_a_reference_cycle_that_never_descends_is_refused(schema: dict[str, Any]) -> None:
    # Without the check these are a RecursionError (a 500) the first time arguments are checked.
    assert "a $ref cycle that never descends into the arguments" in refused(schema)


def test_a_recursive_schema_that_descends_is_accepted_and_checked() -> None:
    schema = created(TREE)
    leaf = {"name": "leaf", "children": []}
    deep: dict[str, Any] = leaf
    for level in range(30):  # 60 levels of JSON, near the 64 the services accept
        deep = {"name": f"n{level}", "children": [deep, leaf]}
    assert check(schema, deep) is None
    assert (
        check(schema, {"name": "a", "children": [{"name": 5}]})
        == "arguments.children[0].name: 5 is not of type 'string'"
    )
    assert check(schema, {"name": "a", "children": [{"children": []}]}) == (
        "arguments.children[0]: 'name' is a required property"
    )
    dynamic = created(
        obj({"children": {"type": "array", "items": {"$dynamicRef": "#node"}}}, **{"$dynamicAnchor": "node"})
    )
    assert check(dynamic, {"children": [{"children": [{"children": 3}]}]}) is not None


@pytest.mark.timeout(10)
def test_an_exponential_expansion_is_refused_at_creation() -> None:
    schema = ladder(30)  # 2 KB, 2^30 evaluations at one place: hours of CPU at the first call
    assert len(json.dumps(schema, separators=(",", ":"))) < 2000
    message = refused(schema)
    assert f"takes more than {MAX_IN_PLACE_COST} subschema evaluations" in message
    assert message.startswith("input_schema['$defs'].l")


def test_an_expansion_within_the_bound_is_accepted_and_checked() -> None:
    schema = created(ladder(6))  # 2^6 applications of the last level at one place
    assert check(schema, {"x": "ok"}) is None
    assert check(schema, {"x": ""}) == "arguments.x: '' should be non-empty"


def test_unevaluated_keywords_count_the_walk_they_repeat() -> None:
    # unevaluatedProperties validates its in-place subschemas again: nesting it multiplies the cost.
    level: dict[str, Any] = {"type": "object"}
    for _ in range(7):  # as deep as a schema may nest (MAX_SCHEMA_DEPTH): already over the bound
        level = {"anyOf": [level, {"required": ["x"]}], "unevaluatedProperties": False}
    assert "subschema evaluations" in refused(obj({"x": level}))


def test_in_place_nesting_is_bounded() -> None:
    defs = {}
    chain: dict[str, Any] = {"type": "string"}
    for index in range(MAX_IN_PLACE_DEPTH + 1):
        defs[f"d{index}"] = chain
        chain = {"$ref": f"#/$defs/d{index}"}
    message = refused(obj({"x": chain}, **{"$defs": defs}))
    assert f"more than {MAX_IN_PLACE_DEPTH} subschemas nested at one place" in message


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (
            obj({"x": {"$schema": "http://json-schema.org/draft-07/schema#", "pattern": "(a+)+$"}}),
            "input_schema.properties.x['$schema']: only allowed at the root",
        ),
        (
            obj({"x": {"const": {"pattern": "(a+)+$"}}, "y": {"$ref": "#/properties/x/const"}}),
            "input_schema.properties.y['$ref']: '#/properties/x/const' does not point to a subschema",
        ),
        (obj({"x": {"$ref": "#/required"}}, required=[]), "input_schema.properties.x['$ref']: '#/required' does not"),
    ],
)
def test_references_that_would_escape_the_bounds_are_refused(schema: dict[str, Any], message: str) -> None:
    assert refused(schema).startswith(message)


# --- the document ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (obj({"x": {"description": "d" * MAX_SCHEMA_CHARS}}), f"input_schema: {MAX_SCHEMA_CHARS + 55} characters"),
        (obj({f"p{i}": {} for i in range(MAX_SCHEMA_NODES)}), f"input_schema: more than {MAX_SCHEMA_NODES} JSON"),
        (obj({"x": {"enum": list(range(MAX_SCHEMA_NODES))}}), f"input_schema: more than {MAX_SCHEMA_NODES} JSON"),
        (
            {"type": "object", "items": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
            "input_schema: nested deeper than 20 levels",
        ),
        (obj({"x": {f"x-{i}": i for i in range(MAX_SCHEMA_KEYS + 1)}}), "input_schema.properties.x: more than 64 keys"),
    ],
)
def test_the_document_is_bounded(schema: dict[str, Any], message: str) -> None:
    assert refused(schema).startswith(message)


def test_the_depth_is_bounded_before_anything_recurses() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"not": deep}
    assert f"nested deeper than {MAX_SCHEMA_DEPTH} levels" in refused(obj({"x": deep}))


@pytest.mark.timeout(20)
def test_the_costliest_admitted_schema_is_checked_quickly() -> None:
    schema = obj({f"p{i}": {"type": "string"} for i in range((MAX_SCHEMA_NODES - 3) // 2)})
    created(schema)
