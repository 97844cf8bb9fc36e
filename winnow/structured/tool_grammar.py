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
    rules = [_start_rule(fmt, parallel), *_call_rules(fmt, functions)]
    return GrammarSpec(kind="lark", source="\n".join(rules) + "\n")


def auto_call_grammar(
    fmt: ToolFormat, functions: list[FunctionSpec], *, parallel: bool
) -> GrammarSpec:
    """Free text, or text up to the format's call marker and from there on calls as
    `forced_call_grammar` holds them (strict tools under tool_choice "auto").

    The marker is a special token where the vocabulary has one (text cannot contain it), else
    a lazy lexeme: llguidance ends the text at the first occurrence of the marker. A format
    whose calls are bare JSON (Llama) starts them at the reply's first `{`, so its free text
    may not begin with one.
    """
    text = r"/\s*([^{\s](.|\n)*)?/" if fmt.bare_json else r"/(.|\n)*/"
    calls = _after_opener(fmt, parallel)
    alternatives = ["TEXT"]
    rules = []
    if fmt.opener_token_id is not None:
        alternatives.append(f"TEXT <[{fmt.opener_token_id}]> {calls}")
    else:
        alternatives.append(f"opened {calls}")
        rules.append(f"opened[lazy]: TEXT {_literal(fmt.opener)}")
    if fmt.bare_json:
        alternatives.append(_repeated("call", _literal(fmt.separator), parallel))
    head = ["%llguidance {}", "start: " + " | ".join(alternatives), f"TEXT: {text}"]
    source = "\n".join([*head, *rules, *_call_rules(fmt, functions)]) + "\n"
    return GrammarSpec(kind="lark", source=source)


def _after_opener(fmt: ToolFormat, parallel: bool) -> str:
    """What follows the call marker."""
    if fmt.closer:
        closing = _literal("\n" + fmt.closer)
        first = f"{_literal(chr(10))} call {closing}"
        more = f"{_literal(fmt.separator + fmt.opener + chr(10))} call {closing}"
        return f"{first} ({more})*" if parallel else first
    calls = _repeated("call", _literal(fmt.separator), parallel)
    if fmt.bracketed:
        return f"{_literal(' [')} {calls} {_literal(']')}"
    return calls


def _repeated(item: str, separator: str, parallel: bool) -> str:
    return f"{item} ({separator} {item})*" if parallel else item


def _call_rules(fmt: ToolFormat, functions: list[FunctionSpec]) -> list[str]:
    """`call`: one call to one of `functions`, its arguments held to the function's schema."""
    if not functions:
        raise ValueError("a tool call grammar needs at least one function")
    rules = ["call: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
    for i, function in enumerate(functions):
        head = f'{{"name": {json.dumps(function.name)}, "{fmt.arguments_key}": '
        schema = {**_closed(function.parameters or NO_PARAMETERS), "x-guidance": JSON_LAYOUT}
        rules.append(f"call_{i}: {_literal(head)} arguments_{i} {_literal('}')}")
        rules.append(f"arguments_{i}: %json {json.dumps(schema)}")
    return rules


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
