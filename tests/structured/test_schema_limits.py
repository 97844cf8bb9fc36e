"""Schema bounds checked before any compiler or validator sees the schema."""

from __future__ import annotations

from typing import Any

import pytest

from winnow.limits import (
    MAX_SCHEMA_ENUM,
    MAX_SCHEMA_NODES,
    MAX_SCHEMA_PROPERTIES,
    MAX_SCHEMA_REQUIRED,
)
from winnow.structured.backend import GrammarError
from winnow.structured.schema_limits import check_schema_shape


def names(count: int) -> list[str]:
    return [f"k{i}" for i in range(count)]


def with_properties(count: int) -> dict[str, Any]:
    return {"type": "object", "properties": {name: {"type": "string"} for name in names(count)}}


# (schema at its cap, the same one past it, the words the refusal uses)
AT_AND_PAST_CAP = {
    "properties": (
        with_properties(MAX_SCHEMA_PROPERTIES),
        # the count is over the whole schema: two objects of half the cap plus one
        {
            "anyOf": [
                with_properties(MAX_SCHEMA_PROPERTIES // 2),
                with_properties(MAX_SCHEMA_PROPERTIES // 2 + 1),
            ]
        },
        "properties in all",
    ),
    "required": (
        {"type": "object", "required": names(MAX_SCHEMA_REQUIRED)},
        {"type": "object", "required": names(MAX_SCHEMA_REQUIRED + 1)},
        "'required' list",
    ),
    "enum": (
        {"enum": names(MAX_SCHEMA_ENUM)},
        {"items": {"enum": names(MAX_SCHEMA_ENUM + 1)}},
        "'enum' list",
    ),
    "nodes": (
        # the dict, the "const" list and its values: 2 + (MAX - 2) nodes
        {"const": list(range(MAX_SCHEMA_NODES - 2))},
        {"const": list(range(MAX_SCHEMA_NODES - 1))},
        f"more than {MAX_SCHEMA_NODES} values",
    ),
}


@pytest.mark.parametrize("bound", AT_AND_PAST_CAP)
def test_each_bound_admits_its_cap_and_refuses_one_more(bound: str) -> None:
    at_cap, past_cap, words = AT_AND_PAST_CAP[bound]
    check_schema_shape(at_cap)
    with pytest.raises(GrammarError, match=words):
        check_schema_shape(past_cap)


def test_the_crashing_required_list_is_refused() -> None:
    with pytest.raises(GrammarError, match="'required' list"):
        check_schema_shape({"type": "object", "required": names(30_000)})
