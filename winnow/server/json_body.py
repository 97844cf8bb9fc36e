"""Checks on a JSON request body that come before field validation: its Content-Type, its
nesting depth (pydantic, jsonschema and the chat template all recurse into what a client sends),
and that every string in it is valid Unicode (JSON can smuggle lone surrogates in as `\\ud800`
escapes).

Parsing a 4 MiB body, walking it and validating it against the request model each take time in
proportion to its size; `ThreadedBodyRoute` does all three on a worker thread, so that a large
body never stalls the streams the event loop is sending.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from winnow.server.errors import ApiError

MAX_JSON_DEPTH = 64
_SCALARS = {int, float, bool, type(None)}


class ThreadedBodyRoute(APIRoute):
    """An APIRoute whose JSON body is parsed, checked (`check_json_value`) and validated
    against the route's body model on a worker thread. FastAPI then finds the parsed model
    cached on the request, and its own validation passes the instance through. Invalid JSON is
    left to FastAPI, which answers it as usual."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return handler
        body_model: type[BaseModel] = model

        async def parse_then_handle(request: Request) -> Response:
            body = await request.body()
            if body and _declares_json(request):
                parsed = await asyncio.to_thread(_parse, body, body_model)
                if parsed is not None:
                    request._json = parsed  # what Request.json() returns from now on
            return await handler(request)

        return parse_then_handle


def _parse(body: bytes, model: type[BaseModel]) -> BaseModel | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    check_json_value(value)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        errors = [
            {**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)
        ]
        raise RequestValidationError(errors, body=value) from None


async def require_json_body(request: Request) -> None:
    """A FastAPI dependency for POST routes with a JSON body: only declared JSON is accepted (a
    browser cannot send that cross-site without a CORS preflight). The route's
    `ThreadedBodyRoute` has checked and validated the body already."""
    if not _declares_json(request):
        raise ApiError(400, "Content-Type must be application/json.")


def _declares_json(request: Request) -> bool:
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


def check_json_value(body: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings holding a lone surrogate; `param`
    names the top-level field (depth) or the string's path (surrogate). Iterative, so that the
    check itself never recurses."""
    stack: list[tuple[str, int, Any]] = [("", 0, body)]
    while stack:
        path, depth, value = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(
                400,
                f"The request nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
                param=_top_level(path),
            )
        if isinstance(value, str):
            if _has_surrogate(value):
                raise _not_unicode(path)
        elif isinstance(value, list):
            # Numbers, booleans and nulls within the depth limit cannot fail: a list of a
            # million ids is skimmed in C (set of types), not walked with a path for each.
            if depth + 1 <= MAX_JSON_DEPTH and set(map(type, value)) <= _SCALARS:
                continue
            stack.extend(
                (f"{path}[{i}]", depth + 1, item) for i, item in reversed(list(enumerate(value)))
            )
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                if _has_surrogate(key):
                    raise _not_unicode(path)
                stack.append((f"{path}.{key}" if path else key, depth + 1, item))


def _top_level(path: str) -> str | None:
    return path.split(".")[0].split("[")[0] or None


def _not_unicode(path: str) -> ApiError:
    return ApiError(
        400, "The request contains a string that is not valid Unicode.", param=path or None
    )


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
