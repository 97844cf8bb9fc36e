"""/openapi.json as the server really behaves: the OpenAI error body on every error status a route
can answer (FastAPI's 422 never happens: validation errors are 400s), `text/event-stream` beside
JSON on the generation routes, and the limits that depend on the model served (context length,
vocabulary, max n, model names) filled into the request schemas."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from winnow.limits import INT64_MAX
from winnow.server.context import ServerContext
from winnow.server.errors import ERROR_TYPES
from winnow.server.lifecycle import METRICS_PATH, PROBE_PATHS
from winnow.server.protocol import ChatCompletionChunk, Completion

ERROR_SCHEMA = "ErrorResponse"
_ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}
_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
# Each generation route's streamed chunk model.
_CHUNKS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": Completion,
}
_GENERATION_ROUTES = tuple(_CHUNKS)
RESPONSES_PATH = "/v1/responses"
# A Responses stream: each event names its type and carries it as JSON, ending with
# response.completed, response.incomplete or response.failed (no [DONE]).
_TYPED_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "pattern": "^(response|error)"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
_REQUEST_SCHEMAS = (
    "ChatCompletionRequest",
    "CompletionRequest",
    "TokenizeRequest",
    "ResponsesRequest",
)
_ERROR_DESCRIPTIONS = {
    400: "The request is invalid; `param` names the field.",
    401: "Missing or wrong API key.",
    404: "Unknown model or route.",
    413: "The request body is larger than the server accepts.",
    429: "The server is at capacity; retry after `Retry-After` seconds.",
    503: "The engine is not running (loading, draining or dead).",
}

# Rules that tie one field to another (or to the prompt's length in tokens) and so cannot be
# stated in JSON Schema: a request that the schema allows may still get a 400 naming one of these
# fields. Each request schema lists them in its description.
CROSS_FIELD_RULES = {
    "messages": "each role's own fields (tool messages need tool_call_id, only assistant "
    "messages carry tool_calls, content is required unless an assistant message has tool calls); "
    "the prompt plus max_tokens must fit the context (code context_length_exceeded)",
    "prompt": "the prompt plus max_tokens must fit the context (code context_length_exceeded); "
    "prompts x n must fit what the server admits; /tokenize takes exactly one of prompt and "
    "messages",
    "min_tokens": "at most max_tokens, and at most what fits in the context after the prompt",
    "seed": "a list of seeds has exactly n entries",
    "best_of": "equal to n when given",
    "top_logprobs": "above 0 only with logprobs true",
    "stream_options": "only with stream true",
    "logit_bias": "token ids below the vocabulary size",
    "tools": "function names unique; parameters a valid JSON Schema",
    "tool_choice": "a named function must be in tools; 'required' and a named function need "
    "tools; 'auto' needs auto tool choice enabled on the server",
    "response_format": "a JSON schema the grammar cannot enforce (invalid, an unsupported "
    "keyword, too deep or too large) is refused",
    "chat_template_kwargs": "may not replace the chat template itself",
    "input": "(responses) each item a message (text parts only), a function_call, or a "
    "function_call_output answering a call made earlier in the conversation",
    "text": "(responses) a json_schema format needs a name and a schema the grammar can enforce",
    "max_output_tokens": "the prompt plus max_output_tokens must fit the context "
    "(code context_length_exceeded)",
    "echo": "not served yet",
    "suffix": "not served by this model",
}


@dataclass(frozen=True)
class ServedLimits:
    """What the schema cannot know from the request models alone."""

    model_names: list[str]
    accept_any_model: bool
    max_model_len: int
    vocab_size: int
    max_n: int
    public_paths: list[str]  # reachable without the API key; empty when there is no key


def install_openapi(app: FastAPI, limits: Callable[[], ServedLimits]) -> None:
    """Replace FastAPI's generated document with the corrected one, built on first use (the
    served limits exist once the model has loaded)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _correct(schema, limits())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _correct(schema: dict[str, Any], limits: ServedLimits) -> None:
    _integer_bounds(schema)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas[ERROR_SCHEMA] = _error_schema()
    if limits.public_paths:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            responses.pop("422", None)
            for status in _error_statuses(path, method, limits):
                responses[str(status)] = _error_response(status)
            if limits.public_paths and path not in limits.public_paths:
                operation["security"] = [{"apiKey": []}]
            if path == METRICS_PATH:
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if path in _CHUNKS:
                responses["200"]["content"]["text/event-stream"] = {
                    "schema": _sse_event_schema(_CHUNKS[path], schemas)
                }
            if path == RESPONSES_PATH and method == "post":
                responses["200"]["content"]["text/event-stream"] = {"schema": _TYPED_EVENT}
    for name in _REQUEST_SCHEMAS:
        _served_limits(schemas[name], limits)
        _describe_cross_field_rules(schemas[name])
    _token_ids(schemas["DetokenizeRequest"]["properties"]["tokens"], limits.vocab_size)


def _integer_bounds(schema: dict[str, Any]) -> None:
    """FastAPI's OpenAPI model holds `minimum`/`maximum` as floats, which turns 2**63 - 1 into
    2**63: give integer bounds back as integers (the only float bound that big is int64's)."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "integer":
                for key in ("minimum", "maximum"):
                    value = node.get(key)
                    if isinstance(value, float) and value.is_integer():
                        node[key] = INT64_MAX if value == float(INT64_MAX) else int(value)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _error_statuses(path: str, method: str, limits: ServedLimits) -> list[int]:
    statuses = []
    if method == "post":
        statuses += [400, 413]
    if path in _GENERATION_ROUTES or method == "post" or "{" in path:
        statuses.append(404)
    if path in _GENERATION_ROUTES:
        statuses += [429, 503]
    if path in PROBE_PATHS:
        statuses.append(503)
    if limits.public_paths and path not in limits.public_paths:
        statuses.append(401)
    return sorted(statuses)


def _sse_event_schema(chunk: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """One event of a stream: `data` is a chunk, an error body (a failure after the 200), or the
    closing `[DONE]`."""
    chunk_schema = chunk.model_json_schema(
        ref_template="#/components/schemas/{model}", mode="serialization"
    )
    for name, definition in {**chunk_schema.pop("$defs", {}), chunk.__name__: chunk_schema}.items():
        schemas.setdefault(name, definition)
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"}, _ERROR_REF]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {"contentMediaType": "application/json", "contentSchema": payload},
            }
        },
    }


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if status in (429, 503):
        response["headers"] = {
            "Retry-After": {"description": "seconds", "schema": {"type": "integer"}}
        }
    return response


def _error_schema() -> dict[str, Any]:
    detail = {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string", "enum": sorted(set(ERROR_TYPES.values()))},
            "param": _NULLABLE_STRING,
            "code": _NULLABLE_STRING,
        },
    }
    return {"type": "object", "required": ["error"], "properties": {"error": detail}}


def _served_limits(model: dict[str, Any], limits: ServedLimits) -> None:
    """Narrow the request model's static ranges to what this server serves."""
    properties = model["properties"]
    if not limits.accept_any_model:
        _narrow(properties["model"], {"enum": limits.model_names})
    room = {"maximum": limits.max_model_len - 1}  # the prompt takes at least one token
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens"):
        if name in properties:
            _narrow(properties[name], room)
    if "n" in properties:
        _narrow(properties["n"], {"maximum": limits.max_n})
    for name in ("stop_token_ids", "prompt"):
        if name in properties:
            _token_ids(properties[name], limits.vocab_size)
    if "logit_bias" in properties:
        _narrow(properties["logit_bias"], {"additionalProperties": False}, kind="object")


def _describe_cross_field_rules(model: dict[str, Any]) -> None:
    rules = [
        f"`{name}`: {rule}"
        for name, rule in CROSS_FIELD_RULES.items()
        if name in model["properties"]
    ]
    text = "Rules between fields, answered with a 400 naming the field:\n- " + "\n- ".join(rules)
    model["description"] = f"{model['description']}\n\n{text}" if "description" in model else text


def _narrow(prop: dict[str, Any], constraints: dict[str, Any], kind: str | None = None) -> None:
    """Apply `constraints` to each non-null alternative of a property (of type `kind` if given);
    a served maximum never widens the model's own (Responses' `n` is at most 1)."""
    for alternative in prop.get("anyOf", [prop]):
        if alternative.get("type") == "null" or (kind and alternative.get("type") != kind):
            continue
        own_maximum = alternative.get("maximum")
        alternative.update(constraints)
        if own_maximum is not None and "maximum" in constraints:
            alternative["maximum"] = min(own_maximum, constraints["maximum"])


def _token_ids(prop: dict[str, Any], vocab_size: int) -> None:
    """Every integer under `prop` (itself, array items, nested arrays) is a token id."""
    stack = [prop]
    while stack:
        node = stack.pop()
        if node.get("type") == "integer":
            node["maximum"] = vocab_size - 1
        stack.extend(node.get("anyOf", []))
        if isinstance(node.get("items"), dict):
            stack.append(node["items"])


def served_limits(ctx: ServerContext) -> ServedLimits:
    engine, config = ctx.engine, ctx.config
    return ServedLimits(
        model_names=ctx.served_names,
        accept_any_model=config.accept_any_model,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        max_n=engine.max_n,
        public_paths=ctx.public_paths if config.api_keys else [],
    )
