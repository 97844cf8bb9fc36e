"""Tool-call formats: how a model family writes a function call, and how to tell which one a
chat template expects.

Three families are served (names as vLLM's `--tool-call-parser` spells them):
- `hermes` (Hermes, Qwen2.5/3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call. Also the default for templates that know no tool format at all.
- `llama3_json` (Llama 3.1-3.3): a bare `{"name": ..., "parameters": {...}}` as the whole reply,
  or after the `<|python_tag|>` special token; parallel calls separated by `; `.
- `mistral`: the `[TOOL_CALLS]` special token, then `[{"name": ..., "arguments": {...}}, ...]`.
  The detokeniser drops special tokens, so a parser sees `[TOOL_CALLS]` as a token id.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class FunctionSpec:
    """A callable function as the request lists it; `parameters` is its JSON schema."""

    name: str
    parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ToolFormat:
    """The shape of the calls one model family writes.

    `opener`: text that opens a call region; `opener_token_id`: the same as a special token id
    (None when the vocabulary has no such special token). `closer`: text that ends each call
    (Hermes). `bare_json`: a reply that begins with `{` is a call (Llama). `bracketed`: calls sit
    in a JSON list after the opener (Mistral). `separator`: what the format writes between calls.
    `arguments_key`: the key the model writes the arguments under (parsers accept both
    `arguments` and `parameters`). `short_ids`: call ids are 9 alphanumerics, as Mistral
    templates demand.
    """

    name: str
    opener: str
    opener_token_id: int | None
    closer: str
    bare_json: bool
    bracketed: bool
    separator: str
    arguments_key: str
    short_ids: bool

    def new_call_id(self) -> str:
        if self.short_ids:
            return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))
        return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))

    def call_object(self, name: str, arguments_json: str) -> str:
        """One call as the model writes it; `arguments_json` is a JSON object's text."""
        return f'{{"name": {json.dumps(name)}, "{self.arguments_key}": {arguments_json}}}'

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        """(name, arguments JSON) pairs as the text of an assistant turn that makes them."""
        objects = [self.call_object(name, arguments) for name, arguments in calls]
        if self.bracketed:
            return f"{self.opener} [{self.separator.join(objects)}]"
        if self.closer:
            return self.separator.join(f"{self.opener}\n{obj}\n{self.closer}" for obj in objects)
        return self.separator.join(objects)


ToolFormatName = Literal["hermes", "llama3_json", "mistral"]
TOOL_FORMAT_NAMES: tuple[ToolFormatName, ...] = get_args(ToolFormatName)
DEFAULT_TOOL_FORMAT = "hermes"


def tool_format(name: str, special_token_id: Callable[[str], int | None]) -> ToolFormat:
    """The format called `name`; `special_token_id` finds a special token's id in the vocabulary."""
    if name == "hermes":
        return ToolFormat(
            name="hermes",
            opener="<tool_call>",
            opener_token_id=None,
            closer="</tool_call>",
            bare_json=False,
            bracketed=False,
            separator="\n",
            arguments_key="arguments",
            short_ids=False,
        )
    if name == "llama3_json":
        return ToolFormat(
            name="llama3_json",
            opener="<|python_tag|>",
            opener_token_id=special_token_id("<|python_tag|>"),
            closer="",
            bare_json=True,
            bracketed=False,
            separator="; ",
            arguments_key="parameters",
            short_ids=False,
        )
    if name == "mistral":
        return ToolFormat(
            name="mistral",
            opener="[TOOL_CALLS]",
            opener_token_id=special_token_id("[TOOL_CALLS]"),
            closer="",
            bare_json=False,
            bracketed=True,
            separator=", ",
            arguments_key="arguments",
            short_ids=True,
        )
    raise ValueError(f"unknown tool call format '{name}' (known: {', '.join(TOOL_FORMAT_NAMES)})")


def detect_tool_format(template: str | None) -> str:
    """The format a chat template writes tool calls in, from the markers it renders; the
    documented default (Hermes) when it shows none."""
    source = template or ""
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or ("<|start_header_id|>" in source and "parameters" in source):
        return "llama3_json"
    return DEFAULT_TOOL_FORMAT
