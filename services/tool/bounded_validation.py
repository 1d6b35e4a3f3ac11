"""Checking arguments against a tenant's ``input_schema`` with bounded work, whatever the arguments.

:func:`~services.tool.schema_bounds.check_bounds` bounds what one place in the arguments can cost; what is left
is the size of the arguments (a megabyte of them, against a schema that looks at every item). So a check spends
from a budget (:mod:`~services.tool.argument_budget`): past :data:`ARGUMENT_BUDGET` units, about 50 ms of CPU, it
stops with a 400, the arguments being too costly to check against this tool's schema.

:data:`BoundedValidator` is jsonschema's Draft 2020-12 validator extended (``jsonschema.validators.extend``):

- every keyword is counted (:func:`~services.tool.argument_budget.counted`);
- ``pattern``, ``patternProperties``, ``additionalProperties`` and ``unevaluatedProperties`` match with RE2
  (:mod:`~services.tool.tenant_regex`): jsonschema's use Python's backtracking ``re``;
- ``unevaluatedProperties``, ``unevaluatedItems`` and ``uniqueItems`` use sets where jsonschema's compare every
  pair, which is quadratic in the instance; their messages are jsonschema's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from altan.errors import InvalidArgument
from services.tool.argument_budget import (
    APPLY,
    ARGUMENT_BUDGET,
    COSTS,
    HASHED_NODE,
    ITERATIONS_PER_UNIT,
    KEYWORD,
    REFERENCE,
    OverBudget,
    budget,
    comparison_cost,
    counted,
    spend,
    spend_regex,
)
from services.tool.schema_bounds import check_bounds, check_document, subschemas
from services.tool.tenant_regex import compile_tenant_regex

__all__ = ["ARGUMENT_BUDGET", "BoundedSchema", "BoundedValidator"]

_RANKED = 4  # an error reported at the top, ranked by best_match (units of argument_budget)
_TOO_COSTLY = "arguments: too costly to check against this tool's schema"


# --- keywords that match with RE2 ------------------------------------------------------------------------


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not compile_tenant_regex(pattern).search(instance, spend_regex):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        regex = compile_tenant_regex(pattern)
        for key, value in instance.items():
            if regex.search(key, spend_regex):
                spend(APPLY)
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _extras(instance: dict[str, Any], schema: dict[str, Any]) -> Iterator[str]:
    """The keys of ``instance`` that neither ``properties`` nor ``patternProperties`` name."""
    properties = schema.get("properties", {})
    regexes = [compile_tenant_regex(pattern) for pattern in schema.get("patternProperties", {})]
    for key in instance:
        if key not in properties and not any(regex.search(key, spend_regex) for regex in regexes):
            yield key


def _extras_message(extras: Iterable[Any]) -> tuple[str, str]:
    listed = list(extras)
    return ", ".join(repr(extra) for extra in listed), "was" if len(listed) == 1 else "were"


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    # jsonschema's, matching patterns with RE2; the messages are its own.
    if not validator.is_type(instance, "object"):
        return
    extras = set(_extras(instance, schema))
    if validator.is_type(additional, "object"):
        for extra in extras:
            spend(APPLY)
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            patterns = ", ".join(repr(each) for each in sorted(schema["patternProperties"]))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {patterns}")
        else:
            listed, verb = _extras_message(sorted(extras, key=str))
            yield ValidationError(f"Additional properties are not allowed ({listed} {verb} unexpected)")


# --- unevaluated*: jsonschema's walks, with sets and RE2 -------------------------------------------------


def _valid(validator: Any, instance: Any, subschema: Any) -> bool:
    """Whether ``instance`` is valid under ``subschema``, without quoting it in an error for a boolean one."""
    if isinstance(subschema, bool):
        return subschema
    spend(APPLY)
    return next(validator.descend(instance, subschema), None) is None


def _referenced(validator: Any, schema: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """``(validator, subschema)`` for where ``schema``'s ``$ref`` and ``$dynamicRef`` lead."""
    for keyword in ("$ref", "$dynamicRef"):
        ref = schema.get(keyword)
        if ref is not None:
            spend(REFERENCE)
            resolved = validator._resolver.lookup(ref)  # as jsonschema's own walk does
            yield validator.evolve(schema=resolved.contents, _resolver=resolved.resolver), resolved.contents


def _in_place_evaluated(
    validator: Any, instance: Any, schema: dict[str, Any], walk: Callable[[Any, Any, Any], set[Any]]
) -> set[Any]:
    """What the in-place subschemas of ``schema`` that apply to ``instance`` evaluate, by ``walk``."""
    found: set[Any] = set()
    for referenced, subschema in _referenced(validator, schema):
        found |= walk(referenced, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, ()):
            if _valid(validator, instance, subschema):
                found |= walk(validator, instance, subschema)
    if "if" in schema:
        if _valid(validator, instance, schema["if"]):
            found |= walk(validator, instance, schema["if"])
            if "then" in schema:
                found |= walk(validator, instance, schema["then"])
        elif "else" in schema:
            found |= walk(validator, instance, schema["else"])
    return found


def _evaluated_keys(validator: Any, instance: dict[str, Any], schema: Any) -> set[str]:
    """jsonschema's ``find_evaluated_property_keys_by_schema``: the keys some subschema evaluated."""
    spend(KEYWORD)
    if isinstance(schema, bool):
        return set()
    evaluated = _in_place_evaluated(validator, instance, schema, _evaluated_keys)
    properties = schema.get("properties")
    if isinstance(properties, dict):
        evaluated |= properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if (subschema := schema.get(keyword)) is not None:
            evaluated.update(key for key, value in instance.items() if _valid(validator, value, subschema))
    if "patternProperties" in schema:
        regexes = [compile_tenant_regex(pattern) for pattern in schema["patternProperties"]]
        evaluated.update(key for key in instance if any(regex.search(key, spend_regex) for regex in regexes))
    for key, subschema in schema.get("dependentSchemas", {}).items():
        if key in instance:
            evaluated |= _evaluated_keys(validator, instance, subschema)
    return evaluated


def _evaluated_indexes(validator: Any, instance: list[Any], schema: Any) -> set[int]:
    """jsonschema's ``find_evaluated_item_indexes_by_schema``: the indexes some subschema evaluated."""
    spend(KEYWORD)
    if isinstance(schema, bool):
        return set()
    if "items" in schema:
        spend(len(instance) // ITERATIONS_PER_UNIT)
        return set(range(len(instance)))
    evaluated = _in_place_evaluated(validator, instance, schema, _evaluated_indexes)
    evaluated.update(range(len(schema.get("prefixItems", ()))))
    for keyword in ("contains", "unevaluatedItems"):
        if keyword in schema:
            evaluated.update(index for index, item in enumerate(instance) if _valid(validator, item, schema[keyword]))
    return evaluated


def _unevaluated_properties(
    validator: Any, unevaluated: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    evaluated = _evaluated_keys(validator, instance, schema)
    invalid = [key for key in instance if key not in evaluated and not _valid(validator, instance[key], unevaluated)]
    if not invalid:
        return
    if unevaluated is False:
        listed, verb = _extras_message(sorted(invalid, key=str))
        yield ValidationError(f"Unevaluated properties are not allowed ({listed} {verb} unexpected)")
    else:
        listed, verb = _extras_message(invalid)
        yield ValidationError(
            f"Unevaluated properties are not valid under the given schema ({listed} {verb} unevaluated and invalid)"
        )


def _unevaluated_items(
    validator: Any, unevaluated: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "array"):
        return
    evaluated = _evaluated_indexes(validator, instance, schema)
    extras = [item for index, item in enumerate(instance) if index not in evaluated]
    if extras:
        listed, verb = _extras_message(extras)
        yield ValidationError(f"Unevaluated items are not allowed ({listed} {verb} unexpected)")


# --- uniqueItems: hashing, not every pair ----------------------------------------------------------------


def _identity(value: Any) -> Hashable:
    """A key equal for two JSON values exactly when jsonschema's ``equal`` says they are (1 == 1.0, true != 1)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        spend(HASHED_NODE * len(value))
        return ("array", tuple(_identity(item) for item in value))
    if isinstance(value, dict):
        spend(HASHED_NODE * len(value))
        return ("object", frozenset((key, _identity(item)) for key, item in value.items()))
    return ("other", id(value))


def _unique_items(validator: Any, unique: Any, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if not unique or not validator.is_type(instance, "array"):
        return
    spend(HASHED_NODE * len(instance))
    seen: set[Hashable] = set()
    for item in instance:
        key = _identity(item)
        if key in seen:
            yield ValidationError(f"{instance!r} has non-unique elements")
            return
        seen.add(key)


# --- false subschemas ------------------------------------------------------------------------------------

# jsonschema quotes the instance for a `false` subschema inside its descend(), where no keyword function sees
# the cost. A compiled schema holds `{"not": _ANYTHING}` there instead, whose refusal `not` reports, counted.
_ANYTHING: dict[str, Any] = {}
_KEYWORDS_TAKING_FALSE = frozenset({"additionalProperties", "items", "unevaluatedItems", "unevaluatedProperties"})
_draft_not = Draft202012Validator.VALIDATORS["not"]


def _not(validator: Any, not_schema: Any, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if not_schema is _ANYTHING:
        yield ValidationError(f"False schema does not allow {instance!r}")
    else:
        yield from _draft_not(validator, not_schema, instance, schema)


_OWN: dict[str, Callable[..., Any]] = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "unevaluatedProperties": _unevaluated_properties,
    "unevaluatedItems": _unevaluated_items,
    "uniqueItems": _unique_items,
    "not": _not,
}

BoundedValidator = validators.extend(
    Draft202012Validator,
    {
        keyword: counted(_OWN.get(keyword, implementation), COSTS.get(keyword))
        for keyword, implementation in Draft202012Validator.VALIDATORS.items()
    },
)
"""Draft 2020-12 with RE2 patterns, linear uniqueness and unevaluated*, every keyword counted against a budget."""


# What a compiled schema keeps: the keywords, what they read besides their own value, and where subschemas
# live for references to reach (check_bounds refuses references anywhere else). Annotations (title,
# description, examples, x-...) go: jsonschema walks every key of a subschema each time it applies it.
_KEPT = frozenset(Draft202012Validator.VALIDATORS) | {
    "prefixItems",
    "then",
    "else",
    "minContains",
    "maxContains",
    "$id",
    "$anchor",
    "$dynamicAnchor",
    "$defs",
    "definitions",
    "contentSchema",
}


class BoundedSchema:
    """A tenant's ``input_schema`` compiled for checks that stay within :data:`ARGUMENT_BUDGET`.

    The schema is checked against the static bounds first (so that a tool stored before they existed cannot
    escape them), then copied: without its annotations, without a root ``$schema`` (jsonschema would switch to
    its own validator class for it), with ``false`` subschemas made countable, resolving references only
    within itself.
    """

    def __init__(self, schema: dict[str, Any], field: str = "input_schema") -> None:
        check_document(schema, field)
        check_bounds(schema, field)
        compiled = self._prepare(copy.deepcopy(schema))
        root = DRAFT202012.create_resource(compiled)
        # The root's URI is jsonschema's own choice (its $id, else ""), so that its lookups find a crawled registry
        # and never crawl again; a registry without a retriever never fetches anything either.
        registry: Registry[Any] = Registry().with_resource(root.id() or "", root).crawl()
        self.validator = BoundedValidator(compiled, registry=registry)

    def _prepare(self, schema: dict[str, Any]) -> dict[str, Any]:
        self._comparisons: dict[int, int] = {}
        pending = [schema]
        while pending:
            subschema = pending.pop()
            for annotation in [key for key in subschema if key not in _KEPT]:
                del subschema[annotation]
            for keyword in ("enum", "const"):
                if keyword in subschema:
                    self._comparisons[id(subschema[keyword])] = comparison_cost(subschema[keyword])
            for keyword, container, position, child in subschemas(subschema):
                if child is False and keyword not in _KEYWORDS_TAKING_FALSE:
                    container[position] = {"not": _ANYTHING}
                elif isinstance(child, dict):
                    pending.append(child)
        return schema

    def best_error(self, arguments: Any) -> ValidationError | None:
        """The most relevant error of ``arguments`` (jsonschema's ``best_match``), or None when they are valid.

        Raises InvalidArgument when checking them would cost more than the budget and no error was found
        before the budget ran out, or when they are nested too deeply to check.
        """
        errors: list[ValidationError] = []
        try:
            with budget(ARGUMENT_BUDGET, self._comparisons) as current:
                for error in self.validator.iter_errors(arguments):
                    errors.append(error)
                    current.remaining -= _RANKED  # ranked below, whatever is left
        except OverBudget:
            if not errors:
                raise InvalidArgument(_TOO_COSTLY) from None
        except RecursionError:
            raise InvalidArgument(f"{_TOO_COSTLY} (nested too deeply)") from None
        return best_match(errors)
