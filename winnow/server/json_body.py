"""Checks on a JSON request body that come before field validation: its Content-Type, its
nesting depth (pydantic, jsonschema and the chat template all recurse into what a client sends),
and that every string in it is valid Unicode (JSON can smuggle lone surrogates in as `\\ud800`
escapes)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from winnow.server.errors import ApiError

MAX_JSON_DEPTH = 64


async def require_json_body(request: Request) -> None:
    """A FastAPI dependency for POST routes with a JSON body.

    Only declared JSON is accepted: a browser cannot send that cross-site without a CORS
    preflight. FastAPI has already parsed the body (and answered invalid JSON) by the time this
    runs, and validates it against the route's model only after this returns; the parsed value
    is cached on the request.
    """
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (
        mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))
    ):
        raise ApiError(400, "Content-Type must be application/json.")
    if await request.body():
        check_json_value(await request.json())


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
