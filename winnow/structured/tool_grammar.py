"""Grammars that force tool calls (`tool_choice` "required" or a named function) in the
model's own format, each call's arguments held to its function's JSON schema.

The grammar is llguidance's Lark dialect: `%json {schema}` embeds a schema. Whitespace inside the
arguments is fixed to `, ` and `: ` (what the formats' own examples use), so a model cannot pad
them with spaces until max_tokens. The arguments object admits only the declared parameters unless
the schema says `additionalProperties` itself (as OpenAI's strict mode does): a function takes the
parameters it declares, and a small model otherwise invents keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from winnow.structured.spec import GrammarSpec
from winnow.structured.tool_formats import FunctionSpec, ToolFormat

# A function that declares no parameters takes none.
NO_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def forced_call_grammar(
    fmt: ToolFormat, functions: list[FunctionSpec], *, parallel: bool
) -> GrammarSpec:
    """Output that is one call (`parallel` False) or one or more calls, each to one of
    `functions`, written in `fmt`; nothing before or after the calls."""
    if not functions:
        raise ValueError("a forced tool call needs at least one function")
    rules = ["call: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
    for i, function in enumerate(functions):
        head = f'{{"name": {json.dumps(function.name)}, "{fmt.arguments_key}": '
        schema = {**_closed(function.parameters or NO_PARAMETERS), "x-guidance": JSON_LAYOUT}
        rules.append(f"call_{i}: {_literal(head)} arguments_{i} {_literal('}')}")
        rules.append(f"arguments_{i}: %json {json.dumps(schema)}")
    return GrammarSpec(kind="lark", source="\n".join([_start_rule(fmt, parallel), *rules]) + "\n")


def _closed(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    if "properties" in schema and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def _start_rule(fmt: ToolFormat, parallel: bool) -> str:
    if fmt.closer:
        item = f"{_literal(fmt.opener + chr(10))} call {_literal(chr(10) + fmt.closer)}"
    else:
        item = "call"
    calls = f"{item} ({_literal(fmt.separator)} {item})*" if parallel else item
    if fmt.bracketed:
        opener = f"<[{fmt.opener_token_id}]>" if fmt.opener_token_id is not None else None
        opener = opener or _literal(fmt.opener)
        return f"start: {opener} {_literal(' [')} {calls} {_literal(']')}"
    return f"start: {calls}"


def _literal(text: str) -> str:
    """A Lark string literal (JSON string escapes are valid Lark escapes)."""
    return json.dumps(text)
