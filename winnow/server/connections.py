"""Bounds on connections, below the app: how long a request may take to arrive, and how many
connections may be open at once.

uvicorn (h11) bounds neither: a client that sends its headers or its body one byte per second
holds its connection for as long as it likes, and a fresh connection that sends nothing is never
closed. Each connection here gets a deadline for its request to arrive whole -- armed when the
connection opens and when the next request on a kept-alive connection starts arriving, disarmed
once the body is complete -- and is answered 408 and closed past it. A connection beyond
`max_connections` is answered 503 at once and closed. The keep-alive idle timeout between
requests is uvicorn's own (`timeout_keep_alive`).

Those answers close gracefully ("lingering close", as nginx and Apache do): the server sends
its end of the stream and discards what the client still sends for up to LINGER_S before it
closes the socket. Closing a socket with unread input makes the kernel send a reset and drop
what is still queued for the client, the answer included; a client sending its request byte by
byte is exactly one that has input in flight when it is answered.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from winnow.server.errors import ApiError, unavailable

TOO_MANY_CONNECTIONS = "The server has too many open connections; retry shortly."
LINGER_S = 2.0  # how long an answered connection's late input is read and discarded


@dataclass(frozen=True)
class ConnectionLimits:
    request_timeout_s: float
    max_connections: int


def bounded_http_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """The HTTP protocol class for uvicorn.Config(http=...), enforcing `limits`."""

    class Protocol(BoundedH11Protocol):
        _limits = limits

    return Protocol


class BoundedH11Protocol(H11Protocol):
    _limits: ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._answered = False  # _answer_and_close has run: input is discarded

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            self._answer_and_close(unavailable(TOO_MANY_CONNECTIONS))
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        if self._deadline is None and self._between_requests():
            self._arm()  # the next request on a kept-alive connection starts arriving
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._disarm()  # the request has arrived whole

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self._limits.request_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._between_requests():
            message = (
                f"The request did not arrive within {self._limits.request_timeout_s:g} s "
                "(--request-timeout)."
            )
            self._answer_and_close(ApiError(408, message))
        else:  # the app is reading the body: it sees a disconnect
            self.transport.close()

    def _answer_and_close(self, error: ApiError) -> None:
        """A whole response written straight to the socket, outside any request cycle."""
        body = json.dumps(error.body()).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
            *(error.headers or {}).items(),
        ]
        head = f"HTTP/1.1 {error.status_code} {_REASONS.get(error.status_code, '')}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
        self.transport.write(head.encode("latin-1") + body)
        self._answered = True
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # after the answer; the client's own close ends it sooner
        self.loop.call_later(LINGER_S, self.transport.close)


_REASONS = {408: "Request Timeout", 503: "Service Unavailable"}
