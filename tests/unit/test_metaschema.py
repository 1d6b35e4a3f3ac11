"""The merged Draft 2020-12 meta-schema: it accepts and refuses exactly what jsonschema's check_schema does."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from services.tool import metaschema

METASCHEMA_CASES: list[Any] = [
    {},
    True,
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 1}}},
    {"type": ["string", "null"], "enum": [1, "a", None], "const": {"a": [1]}},
    {"$defs": {"a": {"$anchor": "a"}}, "$ref": "#a", "$dynamicAnchor": "x"},
    {"definitions": {"a": {}}, "dependencies": {"a": ["b"], "c": {}}, "$recursiveAnchor": "r"},
    {"prefixItems": [{}], "items": False, "contains": {}, "minContains": 1, "unevaluatedItems": {}},
    {"patternProperties": {"^a": {}}, "propertyNames": {"maxLength": 3}, "dependentRequired": {"a": ["b"]}},
    {"if": {}, "then": {}, "else": {}, "not": {}, "allOf": [{}], "anyOf": [{}], "oneOf": [{}]},
    {"contentMediaType": "text/plain", "contentEncoding": "base64", "contentSchema": {}},
    {"format": "email", "title": "t", "description": "d", "default": 1, "examples": [], "deprecated": True},
    {"type": "strin"},
    {"type": []},
    {"minLength": -1},
    {"maxItems": 1.5},
    {"required": ["a", "a"]},
    {"required": "a"},
    {"pattern": "("},
    {"patternProperties": {"(": {}}},
    {"allOf": []},
    {"properties": {"a": 5}},
    {"items": {"type": 3}},
    {"$defs": {"a": {"minimum": "1"}}},
    {"$anchor": "1a"},
    {"$id": "x#frag"},
    {"dependencies": {"a": [1]}},
    {"definitions": {"a": {"type": "nope"}}},
    {"multipleOf": 0},
    {"uniqueItems": "yes"},
    {"$vocabulary": {"x": 1}},
]


@pytest.mark.parametrize("schema", METASCHEMA_CASES)
def test_the_merged_metaschema_accepts_and_refuses_as_jsonschema_does(schema: Any) -> None:
    def outcome(checker: Any) -> str | None:
        try:
            checker(schema)
        except SchemaError as exc:
            return exc.json_path
        return None

    assert outcome(metaschema.check_schema) == outcome(Draft202012Validator.check_schema)
