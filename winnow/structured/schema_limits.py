"""Bounds on a JSON schema checked before any compiler sees it."""

from __future__ import annotations

from typing import Any

from winnow.structured.backend import GrammarError

# Nesting of JSON containers in the schema document (each schema level is usually two: the
# subschema and its "properties"). Deeper schemas are refused before any recursive code runs.
MAX_SCHEMA_NESTING = 64


def check_schema_depth(schema: Any, limit: int = MAX_SCHEMA_NESTING) -> None:
    """GrammarError if `schema` nests containers deeper than `limit` (iterative: never a
    RecursionError, whatever the depth)."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            raise GrammarError(
                f"the JSON schema nests deeper than {limit} levels of objects and arrays"
            )
        stack.extend((child, depth + 1) for child in children)
