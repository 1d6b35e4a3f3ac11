"""The budget of work of one tool call on its arguments, and what checking them against a schema costs.

One unit is about a microsecond of CPU where it was measured (``python bench/tenant_input.py``). Checking the
arguments against the tool's schema spends from a budget of :data:`ARGUMENT_BUDGET` units; the CPU-heavy
built-ins spend from budgets of their own (:mod:`~services.tool.builtins`). The prices of the keywords below
were set so that every shape of schema and arguments measured costs at most about a microsecond per unit, so
that a budget of 50,000 units stays near 50 ms at worst. A keyword pays before it works, as far as its work is
known in advance (the subschemas it will apply, the members it will compare, the bytes a pattern will scan),
and each error it reports pays for its message: jsonschema quotes the instance in it, and the repr of a megabyte
of arguments takes 30 ms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from jsonschema.exceptions import ValidationError

__all__ = [
    "APPLY",
    "ARGUMENT_BUDGET",
    "COSTS",
    "HASHED_NODE",
    "ITERATIONS_PER_UNIT",
    "KEYWORD",
    "REFERENCE",
    "Budget",
    "OverBudget",
    "budget",
    "comparison_cost",
    "counted",
    "spend",
    "spend_regex",
]

# About 30 ms of CPU where it was measured: with the transport around it and two cores shared, another tenant's
# call that waits for one check stays within ~100 ms (tests/e2e/test_hostile_input.py).
ARGUMENT_BUDGET = 30_000
KEYWORD = 2  # one keyword evaluated
APPLY = 12  # one subschema applied to a value (jsonschema's descend: a new validator, a resolver scope)
REFERENCE = 20  # resolving a $ref or $dynamicRef
ITERATIONS_PER_UNIT = 8  # a loop over a schema's map or list that applies nothing (properties, required)
HASHED_NODE = 3  # a JSON value keyed for uniqueItems
_ENUM_SCALARS_PER_UNIT = 6  # enum members compared with a scalar
_NODES_PER_UNIT = 2  # JSON values compared deeply (enum, const)
_SEARCH = 5  # one RE2 search, besides the text it scans
_REGEX_WORK_PER_UNIT = 64  # bytes x RE2 instructions (16 ns each at worst)
_ERROR = 10  # an error created (its message charged besides)
_ERROR_PASSED_UP = 3  # an error passed up through one more keyword (jsonschema records the path on it)
_MESSAGE_CHARS_PER_UNIT = 16  # an error's message, mostly the repr of the instance
_PAID = "_altan_budget_paid"


class OverBudget(Exception):
    """The budget is spent; raised through the library doing the work up to the caller of :func:`budget`."""


@dataclass
class Budget:
    """The units left to the call in progress."""

    remaining: int
    comparisons: dict[int, int] = field(default_factory=dict)  # enum and const values' costs (comparison_cost), by id

    def spend(self, units: int) -> None:
        """Pay for work about to be done: :class:`OverBudget` when there is not enough left."""
        self.remaining -= units
        if self.remaining < 0:
            raise OverBudget

    def comparison(self, value: Any) -> int:
        cost = self.comparisons.get(id(value))
        return comparison_cost(value) if cost is None else cost

    def paid_for(self, error: ValidationError) -> None:
        """Pay for an error, once created (its message quotes the instance) and at each keyword it passes.

        The work is done by then, so the error goes on to be reported even when this overdraws the budget: the
        next work to be paid for is refused instead.
        """
        # Marked on the error itself: cheaper than any set of them, and no id of a dropped error is ever reused.
        if error.__dict__.get(_PAID):
            self.remaining -= _ERROR_PASSED_UP
        else:
            error.__dict__[_PAID] = True
            self.remaining -= _ERROR + len(error.message) // _MESSAGE_CHARS_PER_UNIT


# The budget of the work in progress, wherever a library calls back into us (asyncio.to_thread carries it along).
_current: ContextVar[Budget | None] = ContextVar("altan_work_budget", default=None)


@contextmanager
def budget(units: int, comparisons: dict[int, int] | None = None) -> Iterator[Budget]:
    """Spend at most ``units`` within the block, or :class:`OverBudget` is raised where the budget ran out.

    ``comparisons``: what comparing with each ``enum`` and ``const`` value of a compiled schema costs, by id
    (see :func:`comparison_cost`), computed once per schema.
    """
    current = Budget(units, comparisons or {})
    token = _current.set(current)
    try:
        yield current
    finally:
        _current.reset(token)


def spend(units: int) -> None:
    """Spend from the budget of the call in progress (none outside :func:`budget`: then nothing is counted)."""
    current = _current.get()
    if current is not None:
        current.spend(units)


def spend_regex(work: int) -> None:
    """Pay for one RE2 search of ``work`` = bytes x RE2 instructions (what TenantRegex.search reports)."""
    spend(_SEARCH + work // _REGEX_WORK_PER_UNIT)


def _json_size(value: Any) -> int:
    size, pending = 0, [value]
    while pending:
        item = pending.pop()
        size += 1
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return size


def comparison_cost(value: Any) -> int:
    """Comparing an instance with ``value`` (const) or with each member of it (enum), at worst."""
    members = value if isinstance(value, list) else [value]
    structured = sum(_json_size(member) for member in members if isinstance(member, dict | list))
    return len(members) // _ENUM_SCALARS_PER_UNIT + structured // _NODES_PER_UNIT


Cost = Callable[[Any, Any, dict[str, Any], Budget], int]


def _apply(subschema: Any) -> int:
    """Applying ``subschema`` to one value; a boolean one is decided without a new validator."""
    return 1 if isinstance(subschema, bool) else APPLY


def _in_place(applied: Callable[[Any, dict[str, Any]], int]) -> Cost:
    return lambda value, instance, schema, budget: KEYWORD + applied(value, schema)


def _per_item(kind: type, applied: Callable[[Any, Any, dict[str, Any]], int]) -> Cost:
    """A keyword that applies subschemas to the members of an instance of type ``kind`` (and does nothing else)."""

    def cost(value: Any, instance: Any, schema: dict[str, Any], budget: Budget) -> int:
        return KEYWORD + (applied(value, instance, schema) if isinstance(instance, kind) else 0)

    return cost


def _properties(value: dict[str, Any], instance: Any, schema: dict[str, Any]) -> int:
    matched = value.keys() & instance.keys()
    return len(value) // ITERATIONS_PER_UNIT + sum(_apply(value[key]) for key in matched)


# The keywords whose work is more than constant; any other costs KEYWORD.
COSTS: dict[str, Cost] = {
    "$ref": lambda value, instance, schema, budget: KEYWORD + REFERENCE + APPLY,
    "$dynamicRef": lambda value, instance, schema, budget: KEYWORD + REFERENCE + APPLY,
    "allOf": _in_place(lambda value, schema: sum(map(_apply, value))),
    "anyOf": _in_place(lambda value, schema: sum(map(_apply, value))),
    "oneOf": _in_place(lambda value, schema: sum(map(_apply, value))),
    "not": _in_place(lambda value, schema: _apply(value)),
    "if": _in_place(lambda value, schema: _apply(value) + max(_apply(schema.get("then")), _apply(schema.get("else")))),
    "dependentSchemas": _per_item(
        dict, lambda value, instance, schema: sum(_apply(each) for key, each in value.items() if key in instance)
    ),
    "items": _per_item(
        list, lambda value, instance, schema: max(0, len(instance) - len(schema.get("prefixItems", ()))) * _apply(value)
    ),
    "prefixItems": _per_item(list, lambda value, instance, schema: sum(map(_apply, value[: len(instance)]))),
    "contains": _per_item(list, lambda value, instance, schema: len(instance) * _apply(value)),
    "propertyNames": _per_item(dict, lambda value, instance, schema: len(instance) * _apply(value)),
    "properties": _per_item(dict, _properties),
    "required": lambda value, instance, schema, budget: KEYWORD + len(value) // ITERATIONS_PER_UNIT,
    "dependentRequired": lambda value, instance, schema, budget: (
        KEYWORD + sum(len(each) + 1 for each in value.values()) // ITERATIONS_PER_UNIT
    ),
    "enum": lambda value, instance, schema, budget: KEYWORD + budget.comparison(value),
    "const": lambda value, instance, schema, budget: KEYWORD + budget.comparison(value),
}


def counted(implementation: Callable[..., Any], cost: Cost | None) -> Callable[..., Iterator[ValidationError]]:
    """``implementation`` spending its cost before it runs, and the cost of each error it reports."""

    def keyword(validator: Any, value: Any, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
        current = _current.get()
        if current is not None:
            current.spend(KEYWORD if cost is None else max(KEYWORD, cost(value, instance, schema, current)))
        for error in implementation(validator, value, instance, schema) or ():
            if current is not None:
                current.paid_for(error)
            yield error

    return keyword
