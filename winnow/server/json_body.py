"""Checks on a JSON request body that come before field validation: its Content-Type, and that
every string in it is valid Unicode (JSON can smuggle lone surrogates in as `\\ud800` escapes)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from winnow.server.errors import ApiError


async def require_json_body(request: Request) -> None:
    """A FastAPI dependency for POST routes with a JSON body.

    Only declared JSON is accepted: a browser cannot send that cross-site without a CORS
    preflight. FastAPI has already parsed the body (and answered invalid JSON) by the time this
    runs; the parsed value is cached on the request.
    """
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (
        mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))
    ):
        raise ApiError(400, "Content-Type must be application/json.")
    if await request.body():
        bad_path = _find_surrogate(await request.json())
        if bad_path is not None:
            raise ApiError(
                400,
                "The request contains a string that is not valid Unicode.",
                param=bad_path or None,
            )


def _find_surrogate(body: Any) -> str | None:
    """The path of the first string holding a lone surrogate, or None. Iterative: JSON nesting
    may be nearly as deep as the interpreter's recursion limit."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return path
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                if _has_surrogate(key):
                    return path
                stack.append((f"{path}.{key}" if path else key, item))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
