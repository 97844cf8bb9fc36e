"""API-key authentication as a pure ASGI middleware: deny by default, decided on the raw path.

Keys are held only as SHA-256 digests and compared with `secrets.compare_digest`, so neither the
comparison time nor a log line reveals them.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from winnow.server.errors import error_body


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every route but `public_paths`.

    OPTIONS needs the key like any method, with one exception: a CORS preflight (an OPTIONS with
    `Origin` and `Access-Control-Request-Method`) from one of `allowed_origins`, because browsers
    never send credentials on a preflight. With no allowed origins, CORS is off and no OPTIONS
    passes without the key.
    """

    def __init__(
        self,
        app: ASGIApp,
        api_keys: Iterable[str],
        public_paths: Iterable[str],
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self.app = app
        self._digests = [_digest(key) for key in api_keys]
        self._public_paths = frozenset(public_paths)
        self._allowed_origins = frozenset(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        token = _bearer_token(Headers(scope=scope).get("authorization"))
        if token is not None and self._known(token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        message = "Missing API key." if token is None else "Incorrect API key provided."
        response = JSONResponse(
            error_body(message, "authentication_error", code="invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    def _exempt(self, scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        if scope["path"] in self._public_paths:
            return True
        return scope["method"] == "OPTIONS" and self._allowed_preflight(Headers(scope=scope))

    def _allowed_preflight(self, headers: Headers) -> bool:
        origin = headers.get("origin")
        if origin is None or "access-control-request-method" not in headers:
            return False
        return "*" in self._allowed_origins or origin in self._allowed_origins

    def _known(self, token: str) -> bool:
        digest = _digest(token)
        # Compare against every key so the time taken does not depend on which one matched.
        matches = [secrets.compare_digest(digest, known) for known in self._digests]
        return any(matches)


def _bearer_token(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
