"""The server's life around the engine's: 503s while the model loads, and a drain on SIGTERM.

The port is bound before the model is loaded, so `/health` can say "loading" instead of a client
seeing a refused connection. On SIGTERM (or Ctrl-C) the server keeps listening but admits
nothing: new requests get 503 + Retry-After, `/health` 503 "draining"; requests in flight run on
until the shutdown timeout, then each left ends with an error (an SSE error event and `[DONE]`, or
a 503 body) and the process exits 0. A second signal (Ctrl-C on `make serve` reaches the server
twice) cuts the drain short: the requests in flight end at once, the same way, with one log line.
A third exits without waiting for their responses to leave.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from winnow.server.errors import SHUTTING_DOWN, ApiError, unavailable

if TYPE_CHECKING:
    from winnow.engine.async_engine import AsyncEngine, EngineState

logger = logging.getLogger(__name__)

# Readiness (200 only while the engine serves): `/health` as in vLLM, `/readyz` as Kubernetes
# spells it. Liveness (200 while the process is up, the model loading included): `/livez`.
HEALTH_PATH = "/health"
READY_PATH = "/readyz"
LIVE_PATH = "/livez"
READINESS_PATHS = (HEALTH_PATH, READY_PATH)
PROBE_PATHS = (*READINESS_PATHS, LIVE_PATH)
METRICS_PATH = "/metrics"
_STATE_MESSAGES = {
    "loading": "The model is loading; retry shortly.",
    "draining": SHUTTING_DOWN,
    "dead": "The engine is not running.",
}
_DRAIN_POLL_S = 0.05


def state_unavailable(state: EngineState) -> ApiError:
    """The 503 (with Retry-After) for an engine that is not ready."""
    return unavailable(_STATE_MESSAGES[state])


def health_response(state: EngineState) -> JSONResponse:
    """200 {"status": "ok"} when ready; else 503 with the state and the OpenAI error body."""
    if state == "ready":
        return JSONResponse({"status": "ok"})
    error = state_unavailable(state)
    return JSONResponse(
        {"status": state, **error.body()}, status_code=error.status_code, headers=error.headers
    )


def liveness_response(state: EngineState) -> JSONResponse:
    """200 with the state while the engine loads, serves or drains; 503 once it is dead (the
    process then exits on its own)."""
    if state == "dead":
        return health_response(state)
    return JSONResponse({"status": "alive", "state": state})


class ReadinessGate:
    """ASGI middleware: while the engine is not ready, every route but the probes answers 503.

    /metrics stays open while draining, so a scraper sees the drain happen.
    """

    def __init__(self, app: ASGIApp, engine: AsyncEngine) -> None:
        self.app = app
        self._engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self._engine.state
        if scope["type"] != "http" or state == "ready" or self._open(scope["path"], state):
            await self.app(scope, receive, send)
            return
        error = state_unavailable(state)
        response = JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)
        await response(scope, receive, send)

    def _open(self, path: str, state: EngineState) -> bool:
        return path in PROBE_PATHS or (path == METRICS_PATH and state == "draining")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains instead of closing the port at once.

    uvicorn's own handler would stop listening (new clients see a refused connection rather than
    a 503), cut streams at its graceful timeout without an error event, and re-raise the signal so
    the process exits -15.
    """

    def __init__(
        self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout_s: float
    ) -> None:
        super().__init__(config)
        self._engine = engine
        self._shutdown_timeout_s = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._cut_short = False
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._cut_short:
            self.should_exit = True
            self.force_exit = self._cut_short
            return
        if self._drain_requested:
            self._cut_short = True  # seen by the drain within one poll
            return
        self._drain_requested = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        engine = self._engine
        engine.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._shutdown_timeout_s
        logger.info(
            "draining: %d request(s) in flight, up to %.1f s to finish",
            engine.requests_in_flight,
            self._shutdown_timeout_s,
        )
        while engine.requests_in_flight and loop.time() < deadline and not self._cut_short:
            await asyncio.sleep(_DRAIN_POLL_S)
        if engine.requests_in_flight:
            logger.warning(
                "ending %d request(s) still running %s",
                engine.requests_in_flight,
                "on a second signal" if self._cut_short else "at the shutdown timeout",
            )
            engine.end_in_flight()
        self.should_exit = True
