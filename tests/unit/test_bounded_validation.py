"""Checking arguments within a budget: RE2 patterns, linear keywords, and a clear 400 past the budget."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from altan.errors import InvalidArgument
from services.tool.bounded_validation import BoundedSchema
from services.tool.schema import ArgumentValidator
from tests.unit.test_schema_bounds import check, created, ladder, obj


@pytest.mark.timeout(10)
def test_a_catastrophic_pattern_is_accepted_and_runs_on_re2() -> None:
    schema = created(obj({"x": {"type": "string", "pattern": "^(a+)+$"}}))
    # Python's re would take minutes on each of these; the shared tool service would stall for everyone.
    assert check(schema, {"x": "a" * 40 + "!"}) == f"arguments.x: {'a' * 40 + '!'!r} does not match '^(a+)+$'"
    assert check(schema, {"x": "a" * 40}) is None
    keys = created(obj({}, patternProperties={"^(a+)+$": {"type": "integer"}}, additionalProperties=False))
    assert check(keys, {"a" * 40: 1}) is None
    assert check(keys, {"a" * 40 + "!": 1}) is not None
    names = created(obj({}, propertyNames={"pattern": "^(a|aa)+$"}))
    assert check(names, {"a" * 40 + "b": 1}) is not None
    uneval = created(obj({}, patternProperties={"^(a+)+$": {}}, unevaluatedProperties=False))
    assert check(uneval, {"a" * 40 + "!": 1}) is not None


# --- the budget of a check -------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_arguments_too_costly_to_check_are_a_clear_400() -> None:
    schema = created(obj({"rows": {"type": "array", "items": obj({"id": {"type": "integer"}})}}))
    assert check(schema, {"rows": [{"id": i} for i in range(100)]}) is None
    assert check(schema, {"rows": [{"id": i} for i in range(100_000)]}) == (
        "arguments: too costly to check against this tool's schema"
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("schema", "arguments"),
    [
        # A megabyte of arguments against allowed but costly schemas: each stops at the budget.
        (obj({"a": {"items": {"anyOf": [{"type": "integer"}] * 20}}}), {"a": ["x" * 100] * 10_000}),
        (obj({"a": {"uniqueItems": True}}), {"a": [{"k": [i, str(i)] * 10} for i in range(10_000)]}),
        (obj({"a": {"items": {"enum": [f"v{i}" for i in range(580)]}}}), {"a": ["x" * 100] * 10_000}),
        (obj({"a": {"maxProperties": 1, "anyOf": [False] * 50}}), {"a": {f"k{i}": "x" * 100 for i in range(10_000)}}),
        (obj({"a": {"pattern": "[ab]*a[ab]{30}c"}}), {"a": "ab" * 500_000}),
        (obj({"a": {"items": {"required": [f"r{i}" for i in range(500)]}}}), {"a": [{}] * 2_000}),
        (ladder(6, each_item=True), {"x": ["x"] * 100_000}),
    ],
)
def test_a_check_never_takes_more_than_its_budget(schema: dict[str, Any], arguments: Any) -> None:
    compiled = BoundedSchema(created(schema))
    try:
        compiled.best_error(arguments)
    except InvalidArgument as exc:
        assert exc.message.startswith("arguments: too costly to check")
    # The budget counts work, not time (bench/tenant_input.py measures what it costs); the timeout catches a runaway.


def test_errors_found_before_the_budget_ran_out_are_reported() -> None:
    schema = created(obj({"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "string"}}}))
    assert check(schema, {"a": 1, "b": ["x"] * 100_000}) == "arguments.a: 1 is not of type 'string'"


# --- keywords re-implemented: the same answers as jsonschema's -------------------------------------------

SAME_AS_JSONSCHEMA: list[tuple[dict[str, Any], Any]] = [
    (obj({"a": {"uniqueItems": True}}), {"a": [1, 1.0]}),
    (obj({"a": {"uniqueItems": True}}), {"a": [1, True]}),
    (obj({"a": {"uniqueItems": True}}), {"a": [{"x": [1, {"y": 2}]}, {"x": [1, {"y": 2.0}]}]}),
    (obj({"a": {"uniqueItems": True}}), {"a": [{"x": 1}, {"x": True}, [0], [False]]}),
    (obj({"a": {"uniqueItems": True}}), {"a": ["a", "b", None, 0, False, {}, []]}),
    (obj({"a": False}), {"a": 1}),
    (obj({"a": {"anyOf": [False, {"type": "string"}]}}), {"a": 1}),
    (obj({"a": {"not": False}}), {"a": 1}),
    (obj({}, additionalProperties=False), {"x": 1}),
    (obj({}, patternProperties={"^x": {}}, additionalProperties=False), {"x": 1, "y": 2}),
    (obj({}, patternProperties={"^x": {"type": "string"}}), {"xa": 1}),
    (obj({}, additionalProperties={"type": "string"}), {"x": 1}),
    (obj({"a": {}}, allOf=[{"properties": {"b": {}}}], unevaluatedProperties=False), {"a": 1, "b": 2, "c": 3}),
    (obj({}, anyOf=[{"properties": {"b": {}}, "required": ["b"]}], unevaluatedProperties=False), {"b": 1, "c": 2}),
    (
        obj({}, **{"if": {"required": ["a"]}, "then": {"properties": {"b": {}}}}, unevaluatedProperties=False),
        {"a": 1, "b": 2},
    ),
    (
        obj({}, dependentSchemas={"a": {"properties": {"b": {}}}}, unevaluatedProperties={"type": "integer"}),
        {"a": 1, "b": "x", "c": "y"},
    ),
    (obj({}, patternProperties={"^p": {}}, unevaluatedProperties=False), {"p1": 1, "q": 2}),
    (obj({"l": {"prefixItems": [{}], "unevaluatedItems": False}}), {"l": [1, 2, 3]}),
    (obj({"l": {"prefixItems": [{}], "unevaluatedItems": {"type": "string"}}}), {"l": [1, "x", 3]}),
    (obj({"l": {"contains": {"type": "string"}, "unevaluatedItems": False}}), {"l": ["x", 1]}),
    (obj({"l": {"allOf": [{"prefixItems": [{}, {}]}], "unevaluatedItems": False}}), {"l": [1, 2, 3]}),
    (obj({"l": {"items": {}, "unevaluatedItems": False}}), {"l": [1, 2]}),
    (
        obj(
            {"a": {"$ref": "#/$defs/s"}}, **{"$defs": {"s": {"properties": {"x": {}}, "unevaluatedProperties": False}}}
        ),
        {"a": {"x": 1, "y": 2}},
    ),
]


@pytest.mark.parametrize(("schema", "arguments"), SAME_AS_JSONSCHEMA)
def test_reimplemented_keywords_answer_as_jsonschema_does(schema: dict[str, Any], arguments: Any) -> None:
    expected = [e.message for e in Draft202012Validator(schema).iter_errors(arguments)]
    found = [e.message for e in BoundedSchema(created(schema)).validator.iter_errors(arguments)]
    assert sorted(found) == sorted(expected)


def test_a_false_subschema_names_where_it_refused() -> None:
    # jsonschema reports these at the root ("arguments: False schema..."); counted, they name the property.
    assert check(created(obj({"a": False})), {"a": 1}) == "arguments.a: False schema does not allow 1"


def test_annotations_are_not_compiled_but_stay_in_the_tool() -> None:
    schema = obj({"x": {"type": "string", "description": "shown to the LLM", "x-note": {"$ref": "#/nowhere"}}})
    assert created(schema) == schema
    assert check(created(schema), {"x": "a"}) is None


def test_a_stored_schema_beyond_the_bounds_is_refused_when_checked() -> None:
    # Tools created before the bounds existed are held to them the first time they are invoked.
    stored = copy.deepcopy(ladder(30))
    with pytest.raises(InvalidArgument, match="subschema evaluations"):
        ArgumentValidator().validate("legacy", stored, {"x": "a"})
    with pytest.raises(InvalidArgument, match="lookahead"):
        ArgumentValidator().validate("legacy", obj({"x": {"pattern": "(?=a)"}}), {"x": "a"})


def test_an_error_that_overdraws_the_budget_is_still_reported() -> None:
    # Its message quotes a megabyte: the work is done, so the answer is the error, not "too costly".
    schema = created(obj({"text": {"type": "string", "maxLength": 10}}))
    message = check(schema, {"text": "x" * 1_000_000})
    assert message is not None and message.startswith("arguments.text: 'xxxx") and message.endswith("' is too long")
