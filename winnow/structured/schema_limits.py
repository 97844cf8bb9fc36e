"""Bounds on a JSON schema checked before any compiler or validator sees it.

One iterative walk (never a RecursionError, whatever the schema) checks the nesting and the
sizes in `winnow.limits`. Keys are not told apart from keywords: a property named "enum" counts
as an enum too, which only ever errs on the side of refusing.
"""

from __future__ import annotations

from typing import Any

from winnow.limits import (
    MAX_SCHEMA_ENUM,
    MAX_SCHEMA_NODES,
    MAX_SCHEMA_PROPERTIES,
    MAX_SCHEMA_REQUIRED,
)
from winnow.structured.backend import GrammarError

# Nesting of JSON containers in the schema document (each schema level is usually two: the
# subschema and its "properties"). Deeper schemas are refused before any recursive code runs.
MAX_SCHEMA_NESTING = 64
_LIST_CAPS = (("required", MAX_SCHEMA_REQUIRED), ("enum", MAX_SCHEMA_ENUM))


def check_schema_shape(schema: Any, *, nesting: int = MAX_SCHEMA_NESTING) -> None:
    """GrammarError naming the bound if `schema` nests deeper than `nesting`, holds more than
    MAX_SCHEMA_NODES values or MAX_SCHEMA_PROPERTIES properties, or has a `required` or `enum`
    list over its cap."""
    nodes = 0
    properties = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise GrammarError(f"the JSON schema has more than {MAX_SCHEMA_NODES} values")
        if isinstance(node, dict):
            children: Any = node.values()
            properties += _length(node, "properties", dict)
            if properties > MAX_SCHEMA_PROPERTIES:
                raise GrammarError(
                    f"the JSON schema has more than {MAX_SCHEMA_PROPERTIES} properties in all"
                )
            for keyword, cap in _LIST_CAPS:
                if _length(node, keyword, list) > cap:
                    raise GrammarError(
                        f"the JSON schema has a '{keyword}' list longer than {cap} entries"
                    )
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > nesting:
            raise GrammarError(
                f"the JSON schema nests deeper than {nesting} levels of objects and arrays"
            )
        stack.extend((child, depth + 1) for child in children)


def _length(node: dict[str, Any], keyword: str, kind: type[dict[str, Any] | list[Any]]) -> int:
    value = node.get(keyword)
    return len(value) if isinstance(value, kind) else 0
