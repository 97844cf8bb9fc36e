"""Server-sent events exactly as docs/api.md frames them.

Every event is `data: <one-line JSON>\\n\\n`; keep-alives are `: ping` comments; the stream always
ends with `data: [DONE]\\n\\n`, after an error event if something failed once the 200 was sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from winnow.engine.outputs import RequestOutput
from winnow.server.errors import ENGINE_ERRORS, ApiError, engine_error, error_body
from winnow.server.generation import OutputSource
from winnow.server.protocol import GenerationFields

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"
MEDIA_TYPE = "text/event-stream"

T = TypeVar("T")

# Characters that JSON leaves raw inside strings but that str.splitlines() (and so httpx's
# iter_lines, and many hand-written SSE readers) takes for line breaks: written as \u escapes,
# every event stays one line for every client. JSON escapes all other control characters itself.
_LINE_BREAKS_JSON_KEEPS = str.maketrans(
    {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


class ChunkBuilder(Protocol):
    """Turns engine deltas into the response's chunk objects (chat or text completion)."""

    def chunks(self, output: RequestOutput) -> Iterable[BaseModel]: ...

    def closing_chunks(self, final: RequestOutput) -> Iterable[BaseModel]: ...


def usage_chunk_wanted(request: GenerationFields) -> bool:
    """`stream_options.include_usage`; stream_options on a non-streaming request is a 400."""
    if request.stream_options is None:
        return False
    if not request.stream:
        raise ApiError(
            400, "stream_options is only allowed when stream is true", param="stream_options"
        )
    return bool(request.stream_options.include_usage)


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One data event on one line, whatever the client counts as a line break."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.translate(_LINE_BREAKS_JSON_KEEPS).encode() + b"\n\n"


async def with_keepalive(source: AsyncIterator[T], interval_s: float) -> AsyncIterator[T | None]:
    """Items of `source`, with a None whenever `interval_s` passes without one."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()


async def sse_body(
    generation: OutputSource, builder: ChunkBuilder, keepalive_s: float
) -> AsyncIterator[bytes]:
    """The whole event stream of one request; aborts it if the client goes away mid-stream."""
    try:
        final: RequestOutput | None = None
        async for output in with_keepalive(generation.outputs(), keepalive_s):
            if output is None:
                yield PING
                continue
            final = output
            for chunk in builder.chunks(output):
                yield sse_event(chunk)
        assert final is not None, "the engine ended a request without output"
        for chunk in builder.closing_chunks(final):
            yield sse_event(chunk)
    except Exception as exc:
        yield sse_event(_stream_error(exc))
    finally:
        generation.close()
    yield DONE


def _stream_error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ENGINE_ERRORS):
        return engine_error(exc).body()
    logger.exception("error while streaming a response", exc_info=exc)
    return error_body("The server had an error while streaming the response.", "server_error")


def sse_response(generation: OutputSource, body: AsyncIterator[bytes]) -> StreamingResponse:
    """The closing background task aborts the request even when the client leaves before the
    body generator ever started (then its own `finally` never runs)."""
    return StreamingResponse(
        body,
        media_type=MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(generation.close),
    )
