"""`response_format` -> a GrammarSpec, and compiling a request's grammar before it is submitted.

Every problem with a schema -- not a valid JSON schema, over a size bound, a keyword the grammar
backend cannot enforce, a compile that runs too long -- is a 400 naming the field that carried
it, given before any 200 goes out. Checking and compiling a schema take time in proportion to
its size, so both run on a grammar thread (`winnow.server.grammar_pool`), never on the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from winnow.server.errors import ApiError
from winnow.server.grammar_pool import COMPILE_TIMEOUT_S, run_grammar_job
from winnow.server.protocol import ResponseFormat
from winnow.structured.backend import CompiledGrammar, GrammarError
from winnow.structured.schema_limits import check_schema_shape
from winnow.structured.spec import GrammarSpec

if TYPE_CHECKING:
    from winnow.engine.async_engine import AsyncEngine

_PARAM = "response_format"


def grammar_spec(response_format: ResponseFormat | None, param: str = _PARAM) -> GrammarSpec | None:
    """The constraint `response_format` asks for (None for text); 400 naming `param` for a bad
    schema. The schema's bounds are checked before its meta-validation, whose time grows with
    its size."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object" or response_format.json_schema is None:
        return GrammarSpec("json_object")
    schema = response_format.json_schema.schema_
    if schema is None:  # OpenAI makes `schema` optional; without one, any JSON object will do
        return GrammarSpec("json_object")
    try:
        check_schema_shape(schema)
    except GrammarError as exc:
        raise ApiError(400, str(exc), param=param) from None
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        message = f"the JSON schema is not valid: {exc.message}"
        raise ApiError(400, message, param=param) from None
    return GrammarSpec("json_schema", json.dumps(schema))


async def prepare_grammar(
    engine: AsyncEngine, build: Callable[[], GrammarSpec | None], param: str = _PARAM
) -> tuple[GrammarSpec, CompiledGrammar] | None:
    """The spec `build()` returns and its compiled form, for `Generation`; both run on a
    grammar thread. 400 naming `param` if the grammar cannot be enforced or takes longer than
    COMPILE_TIMEOUT_S."""
    try:
        return await run_grammar_job(partial(_build_and_compile, engine, build))
    except GrammarError as exc:
        raise ApiError(400, str(exc), param=param) from None
    except TimeoutError:
        message = f"the grammar took longer than {COMPILE_TIMEOUT_S:g} s to compile"
        raise ApiError(400, message, param=param) from None


def _build_and_compile(
    engine: AsyncEngine, build: Callable[[], GrammarSpec | None]
) -> tuple[GrammarSpec, CompiledGrammar] | None:
    spec = build()
    return None if spec is None else (spec, engine.compile_grammar(spec))
