"""The OpenAI error body for every failure, and the handlers that map exceptions onto it.

Every error leaves as `{"error": {"message", "type", "param", "code"}}`. Validation errors name
the offending field in `param` as a path: `temperature`, `messages[0].role`, `tools[1].function`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from winnow.engine.request import (
    EngineDeadError,
    EngineDraining,
    EngineOverloaded,
    RequestFailed,
)
from winnow.limits import InvalidRequest

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it; never seen by the departed client
RETRY_AFTER_OVERLOADED_S = 1
RETRY_AFTER_UNAVAILABLE_S = 5

# What the engine (and SamplingParams) raise about a request; see engine_error().
ENGINE_ERRORS = (InvalidRequest, EngineOverloaded, EngineDeadError, RequestFailed)

# Labels pydantic puts into an error location for union members and wrappers, not fields.
_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class ApiError(HTTPException):
    """An error answered with the OpenAI error body.

    It derives from HTTPException so that FastAPI passes it through untouched when it is raised
    while the request body is read.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers)
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status_code, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class ClientDisconnected(Exception):
    """The client went away before the response was ready; nobody will read the answer."""


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def engine_error(exc: Exception, renames: Mapping[str, str] | None = None) -> ApiError:
    """The ApiError for an exception raised by the engine or by SamplingParams.

    `renames` maps an engine-side parameter name to the request field it came from where they
    differ (max_tokens <- max_completion_tokens), so that `param` names what the client sent.
    """
    if isinstance(exc, InvalidRequest):
        param = (renames or {}).get(exc.param or "", exc.param)
        return ApiError(400, exc.message, param=param, code=exc.code)
    if isinstance(exc, EngineOverloaded):
        return ApiError(
            429,
            "The server is at capacity; retry shortly.",
            headers={"Retry-After": str(RETRY_AFTER_OVERLOADED_S)},
        )
    if isinstance(exc, EngineDraining):
        return unavailable(SHUTTING_DOWN)
    if isinstance(exc, EngineDeadError):
        return unavailable()
    if isinstance(exc, RequestFailed):
        return ApiError(500, str(exc))
    raise TypeError(f"not an engine error: {exc!r}")


@contextmanager
def client_errors(renames: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turn the engine's and SamplingParams' verdicts on a request into 400s naming the request
    field (see engine_error for `renames`)."""
    try:
        yield
    except InvalidRequest as exc:
        raise engine_error(exc, renames) from exc


SHUTTING_DOWN = "The server is shutting down; retry the request."


def unavailable(message: str = "The engine is not running.") -> ApiError:
    return ApiError(503, message, headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})


def loc_to_param(loc: Sequence[int | str]) -> str | None:
    """Turn a pydantic error location into a field path such as `messages[0].content`.

    The path stops where pydantic starts naming union members (`str`, `list[int]`, `TextPart`)
    or dictionary keys, so that `param` always names a field the client sent.
    """
    if "[key]" in loc:  # a bad dictionary key: name the dictionary
        loc = loc[: list(loc).index("[key]") - 1]
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.isidentifier() and item.islower() and item not in _TYPE_LABELS:
            parts.append(f".{item}" if parts else item)
        else:
            break
    return "".join(parts) or None


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "invalid JSON")
        return ApiError(400, f"The request body is not valid JSON: {detail}.")
    loc = list(first["loc"])
    source = loc.pop(0) if loc else "body"
    param = loc_to_param(loc)
    if source == "body" and param is None:
        return ApiError(400, "The request body must be a JSON object.")
    where = param or source
    return ApiError(400, f"Invalid '{where}': {first['msg']}.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, FastAPI's own included, answer with the OpenAI error body."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})."
        else:
            message = str(exc.detail)
        headers = dict(exc.headers) if exc.headers else None
        return error_response(ApiError(exc.status_code, message, headers=headers))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(_validation_error(exc))

    async def on_engine_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(engine_error(exc))

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for engine_exc in ENGINE_ERRORS:
        app.add_exception_handler(engine_exc, on_engine_error)
    app.add_exception_handler(ClientDisconnected, on_disconnect)
    app.add_middleware(UnexpectedErrorMiddleware)


class UnexpectedErrorMiddleware:
    """A 500 with the OpenAI error body for an exception no handler claims, logged once.

    Starlette's own handler for `Exception` re-raises after answering, so that the server logs
    the traceback a second time; this one answers and swallows it. It sits inside the request-id
    middleware, so the log line names the request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            request_id = scope.get("state", {}).get("request_id", "-")
            logger.exception(
                "request %s: unhandled error on %s %s", request_id, scope["method"], scope["path"]
            )
            if not started:
                body = error_body("The server had an error processing the request.", "server_error")
                await JSONResponse(body, status_code=500)(scope, receive, send)
