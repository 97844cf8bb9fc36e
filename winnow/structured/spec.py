"""What a request constrains its output to, independent of the grammar backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on every choice of one request.

    kind "json_object": any JSON object (`source` unused).
    kind "json_schema": `source` is the JSON schema, serialised as JSON text.
    kind "lark": `source` is a Lark grammar in llguidance's dialect (`%json {...}` embeds a JSON
    schema); tool calls forced in the model's own format use it.
    """

    kind: Literal["json_object", "json_schema", "lark"]
    source: str = ""
