"""Static bounds on a tenant's ``input_schema``, checked when the tool is created (and again when one is compiled).

A schema is refused, with a 400 naming the JSON path at fault, when evaluating it could take unbounded or
merely excessive time or memory, whatever the arguments:

- the document: at most :data:`MAX_SCHEMA_CHARS` characters of JSON, :data:`MAX_SCHEMA_NODES` JSON values,
  :data:`MAX_SCHEMA_DEPTH` levels, :data:`MAX_SCHEMA_KEYS` keys in one schema object; every regular expression
  within :mod:`~services.tool.tenant_regex`'s bounds, :data:`MAX_TOTAL_PROGRAM` RE2 instructions in all;
- references: a ``$ref``/``$dynamicRef`` cycle that never passes through a keyword that descends into the
  instance (``properties``, ``items``, ...) would recurse forever at the same place in the arguments;
- expansion: applying one subschema at one place in the arguments may cost at most :data:`MAX_IN_PLACE_COST`
  subschema evaluations, counted through everything applied at that same place (``allOf``/``anyOf``/``oneOf``,
  ``not``, ``if``/``then``/``else``, ``dependentSchemas``, ``$ref``, ``$dynamicRef``; ``unevaluated*`` walk
  those again), and nest at most :data:`MAX_IN_PLACE_DEPTH` of them. Two kilobytes of ``allOf`` whose entries
  each reference the next level twice expand to 2^30 evaluations: refused here, in time linear in the schema,
  because each subschema's cost is computed once over the reference graph.

What descends into the instance is bounded by the instance: the arguments are at most 64 levels deep, and the
validator spends a budget per call (:mod:`~services.tool.bounded_validation`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from altan.api.common import MAX_STRUCT_DEPTH
from altan.errors import InvalidArgument
from services.tool.tenant_regex import (
    MAX_PATTERN_LENGTH,
    MAX_PATTERN_NESTING,
    RegexRefused,
    compile_tenant_regex,
    pattern_nesting,
)

__all__ = [
    "MAX_IN_PLACE_COST",
    "MAX_IN_PLACE_DEPTH",
    "MAX_SCHEMA_CHARS",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_KEYS",
    "MAX_SCHEMA_NODES",
    "MAX_TOTAL_PROGRAM",
    "check_bounds",
    "check_document",
    "subschemas",
]

MAX_SCHEMA_CHARS = 32 * 1024
MAX_SCHEMA_NODES = 600
# The same bound as every document that travels as a Struct (the gateway refuses deeper ones first).
MAX_SCHEMA_DEPTH = MAX_STRUCT_DEPTH
MAX_SCHEMA_KEYS = 64
MAX_TOTAL_PROGRAM = 20_000
MAX_IN_PLACE_COST = 1000
MAX_IN_PLACE_DEPTH = 32

# Where Draft 2020-12 keeps subschemas (the same places `referencing` crawls), by how they apply.
_IN_PLACE = frozenset({"not", "if", "then", "else", "allOf", "anyOf", "oneOf", "dependentSchemas"})
_ONE = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "items",
        "contains",
        "additionalProperties",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
        "contentSchema",
    }
)
_MANY = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_MAP = frozenset({"dependentSchemas", "properties", "patternProperties", "$defs", "definitions"})
_KEYWORDS = frozenset(Draft202012Validator.VALIDATORS)
_DEFAULT_BASE = "urn:altan:input-schema"


def _step(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"


def subschemas(schema: dict[str, Any]) -> Iterator[tuple[str, Any, str | int, Any]]:
    """``(keyword, container, key, subschema)`` for each subschema held directly by ``schema``.

    ``container[key]`` is the subschema, so a caller can replace it.
    """
    for keyword, value in schema.items():
        if keyword in _ONE:
            yield keyword, schema, keyword, value
        elif keyword in _MANY and isinstance(value, list):
            for index, item in enumerate(value):
                yield keyword, value, index, item
        elif keyword in _MAP and isinstance(value, dict):
            for key, item in value.items():
                yield keyword, value, key, item


def check_document(schema: Any, field: str) -> None:
    """Size and shape bounds, checked before anything walks the schema recursively.

    Patterns are measured here too: the meta-schema check compiles them with Python's ``re``, whose parser
    recurses once per group.
    """
    try:
        size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{field}: not a JSON document of at most {MAX_SCHEMA_DEPTH} levels") from exc
    if size > MAX_SCHEMA_CHARS:
        raise InvalidArgument(f"{field}: {size} characters of JSON; at most {MAX_SCHEMA_CHARS}")
    nodes = 0
    pending: list[tuple[Any, str, int]] = [(schema, field, 1)]
    while pending:
        value, path, depth = pending.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InvalidArgument(f"{field}: more than {MAX_SCHEMA_NODES} JSON values")
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidArgument(f"{path}: nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                where = _step(path, key)
                if key == "pattern" and isinstance(item, str):
                    _check_pattern_shape(item, where)
                if key == "patternProperties" and isinstance(item, dict):
                    for pattern in item:
                        _check_pattern_shape(pattern, _step(where, pattern))
                pending.append((item, where, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, _step(path, index), depth + 1) for index, item in enumerate(value))


def _check_pattern_shape(pattern: str, where: str) -> None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InvalidArgument(f"{where}: a pattern longer than {MAX_PATTERN_LENGTH} characters")
    if pattern_nesting(pattern) > MAX_PATTERN_NESTING:
        raise InvalidArgument(f"{where}: a pattern with groups nested deeper than {MAX_PATTERN_NESTING} levels")


@dataclass
class _Node:
    """One subschema object at a schema position, and what its evaluation at one place in the instance costs."""

    schema: dict[str, Any]
    path: str
    resolver: Any  # a referencing.Resolver, scoped to this subschema's base URI
    edges: list[Any] = field(default_factory=list)  # in-place subschemas: dicts (positions) or booleans
    cost: int = 0  # subschema evaluations when applied at one place (saturates above the bound)
    rewalk: int = 0  # what unevaluated* spend walking the in-place subschemas again
    depth: int = 0


def check_bounds(schema: dict[str, Any], field: str) -> None:
    """Refuse ``schema`` unless evaluating it is bounded as the module says. Linear in the schema's size.

    Call after the meta-schema check: it relies on keywords having the shapes the meta-schema requires.
    """
    root = DRAFT202012.create_resource(schema)
    base = root.id() or _DEFAULT_BASE
    resolver = Registry().with_resource(base, root).crawl().resolver(base_uri=base)
    nodes = _positions(schema, field, resolver)
    _link(nodes)
    _measure(nodes)


def _positions(schema: dict[str, Any], field: str, resolver: Any) -> dict[int, _Node]:
    """Every subschema object at a schema position, by id; patterns compiled, and the per-object bounds."""
    nodes: dict[int, _Node] = {}
    program, compiled = 0, set()  # a pattern used twice is compiled once
    pending = [(schema, field, resolver)]
    while pending:
        subschema, path, scope = pending.pop()
        nodes[id(subschema)] = _Node(subschema, path, scope)
        if len(subschema) > MAX_SCHEMA_KEYS:
            raise InvalidArgument(f"{path}: more than {MAX_SCHEMA_KEYS} keys in one schema object")
        if "$schema" in subschema and subschema is not schema:
            # jsonschema would switch to another (unbounded) validator class for that subschema.
            raise InvalidArgument(f"{_step(path, '$schema')}: only allowed at the root of the schema")
        patterns = []
        if isinstance(subschema.get("pattern"), str):
            patterns.append((subschema["pattern"], _step(path, "pattern")))
        for pattern in subschema.get("patternProperties", {}):
            patterns.append((pattern, _step(_step(path, "patternProperties"), pattern)))
        for pattern, where in patterns:
            if pattern in compiled:
                continue
            compiled.add(pattern)
            try:
                program += compile_tenant_regex(pattern).program_size
            except RegexRefused as exc:
                raise InvalidArgument(f"{where}: {exc}") from exc
            if program > MAX_TOTAL_PROGRAM:
                raise InvalidArgument(f"{where}: the schema's patterns are too complex together")
        for keyword, container, key, child in subschemas(subschema):
            if isinstance(child, dict):
                where = _step(path, keyword) if container is subschema else _step(_step(path, keyword), key)
                # A new base URI only where an $id says so (what in_subresource would answer, without its cost).
                child_scope = scope.in_subresource(DRAFT202012.create_resource(child)) if "$id" in child else scope
                pending.append((child, where, child_scope))
    return nodes


def _link(nodes: dict[int, _Node]) -> None:
    """The in-place edges of every node: in-place subschemas, and where its references may lead."""
    dynamic_anchors: dict[str, list[Any]] = {}
    for node in nodes.values():
        anchor = node.schema.get("$dynamicAnchor")
        if isinstance(anchor, str):
            dynamic_anchors.setdefault(anchor, []).append(node.schema)
    for node in nodes.values():
        for keyword, _container, _key, child in subschemas(node.schema):
            if keyword in _IN_PLACE:
                node.edges.append(child)
        for keyword in ("$ref", "$dynamicRef"):
            ref = node.schema.get(keyword)
            if not isinstance(ref, str):
                continue
            where = _step(node.path, keyword)
            if not ref.startswith("#"):
                raise InvalidArgument(f"{where}: {ref!r} is remote; only local references (#...)")
            try:
                target = node.resolver.lookup(ref).contents
            except Unresolvable as exc:
                raise InvalidArgument(f"{where}: {ref!r} does not resolve") from exc
            if not isinstance(target, bool) and id(target) not in nodes:
                raise InvalidArgument(f"{where}: {ref!r} does not point to a subschema")
            node.edges.append(target)
            if keyword == "$dynamicRef":
                # Which anchor a dynamic reference reaches depends on the path taken: assume all of its name.
                node.edges.extend(dynamic_anchors.get(ref[1:], []))


def _measure(nodes: dict[int, _Node]) -> None:
    """Cost and depth of every node, each computed once (post-order over the in-place graph); refuse cycles."""
    done: set[int] = set()
    on_path: set[int] = set()
    for start in nodes:
        if start in done:
            continue
        stack: list[tuple[int, int]] = [(start, 0)]  # (node id, index of the next edge to visit)
        on_path.add(start)
        while stack:
            current, next_edge = stack[-1]
            node = nodes[current]
            edges = node.edges
            if next_edge < len(edges):
                stack[-1] = (current, next_edge + 1)
                child = edges[next_edge]
                if isinstance(child, bool) or id(child) in done:
                    continue
                if id(child) in on_path:
                    raise InvalidArgument(
                        f"{nodes[id(child)].path}: a $ref cycle that never descends into the arguments "
                        "(it would apply the same subschema at the same place forever)"
                    )
                on_path.add(id(child))
                stack.append((id(child), 0))
                continue
            _settle(node, nodes)
            stack.pop()
            on_path.discard(current)
            done.add(current)


def _settle(node: _Node, nodes: dict[int, _Node]) -> None:
    limit = MAX_IN_PLACE_COST + 1  # saturate: the exact size of a refused expansion does not matter
    children = [nodes[id(child)] if not isinstance(child, bool) else None for child in node.edges]
    spent = 1 + sum(1 for keyword in node.schema if keyword in _KEYWORDS)
    rewalk = 0
    depth = 0
    for child in children:
        cost = child.cost if child else 1
        spent = min(limit, spent + cost)
        rewalk = min(limit, rewalk + cost + (child.rewalk if child else 0))
        depth = max(depth, child.depth if child else 0)
    unevaluated = ("unevaluatedProperties" in node.schema) + ("unevaluatedItems" in node.schema)
    node.cost = min(limit, spent + unevaluated * rewalk)
    node.rewalk = rewalk
    node.depth = depth + 1
    if node.cost > MAX_IN_PLACE_COST:
        raise InvalidArgument(
            f"{node.path}: applying this subschema at one place in the arguments takes more than "
            f"{MAX_IN_PLACE_COST} subschema evaluations (allOf/anyOf/oneOf/$ref expansion)"
        )
    if node.depth > MAX_IN_PLACE_DEPTH:
        raise InvalidArgument(
            f"{node.path}: more than {MAX_IN_PLACE_DEPTH} subschemas nested at one place in the arguments "
            "(allOf/anyOf/oneOf/not/if/$ref chains)"
        )
