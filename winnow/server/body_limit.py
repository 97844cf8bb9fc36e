"""413 with the OpenAI error body for request bodies over `--max-request-bytes`.

A declared Content-Length over the limit is refused before anything is read; a body without one
(chunked) is counted as it arrives and refused as soon as it crosses the limit.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from winnow.server.errors import ApiError


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {limit} bytes.")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = too_large(self.max_bytes)
            response = JSONResponse(error.body(), status_code=error.status_code)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException: FastAPI lets it through from the body read to our handler.
                    raise too_large(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)
