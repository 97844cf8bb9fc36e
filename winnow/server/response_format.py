"""`response_format` -> a GrammarSpec, and compiling a request's grammar before it is submitted.

Every problem with a schema -- not a valid JSON schema, nested too deep, a keyword the grammar
backend cannot enforce, a compile that runs too long -- is a 400 naming the field that carried
it, given before any 200 goes out.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from winnow.server.errors import ApiError
from winnow.server.protocol import ResponseFormat
from winnow.structured.backend import CompiledGrammar, GrammarError
from winnow.structured.schema_limits import check_schema_depth
from winnow.structured.spec import GrammarSpec

if TYPE_CHECKING:
    from winnow.engine.async_engine import AsyncEngine

# A backstop only: llguidance's own fuel limits end a pathological compile long before this.
COMPILE_TIMEOUT_S = 10.0
_PARAM = "response_format"


def grammar_spec(response_format: ResponseFormat | None, param: str = _PARAM) -> GrammarSpec | None:
    """The constraint `response_format` asks for (None for text); 400 naming `param` for a bad
    schema."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object" or response_format.json_schema is None:
        return GrammarSpec("json_object")
    schema = response_format.json_schema.schema_
    if schema is None:  # OpenAI makes `schema` optional; without one, any JSON object will do
        return GrammarSpec("json_object")
    try:
        check_schema_depth(schema)
    except GrammarError as exc:
        raise ApiError(400, str(exc), param=param) from None
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        message = f"the JSON schema is not valid: {exc.message}"
        raise ApiError(400, message, param=param) from None
    return GrammarSpec("json_schema", json.dumps(schema))


async def prepare_grammar(
    engine: AsyncEngine, spec: GrammarSpec | None, param: str = _PARAM
) -> tuple[GrammarSpec, CompiledGrammar] | None:
    """`spec` and its compiled form, for `Generation`. Compiles in a worker thread (the event
    loop and the engine thread keep going); 400 naming `param` if it cannot be enforced."""
    if spec is None:
        return None
    work = asyncio.to_thread(engine.compile_grammar, spec)
    try:
        return spec, await asyncio.wait_for(work, COMPILE_TIMEOUT_S)
    except GrammarError as exc:
        raise ApiError(400, str(exc), param=param) from None
    except TimeoutError:
        message = f"the grammar took longer than {COMPILE_TIMEOUT_S:g} s to compile"
        raise ApiError(400, message, param=param) from None
