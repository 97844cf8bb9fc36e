"""Slow and idle clients against the real server: a request sent one byte per second is cut off
at --request-timeout, an idle kept-alive connection at --timeout-keep-alive, and a connection
beyond --max-connections is answered 503 at once."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, start_server, stop_server

REQUEST_TIMEOUT_S = 2
KEEP_ALIVE_S = 1
MAX_CONNECTIONS = 3
HEADERS = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
    b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
)


@pytest.fixture(scope="module")
def slow_server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("slow-clients") / "server.log"
    proc = start_server(
        demo_model_dir,
        log_path,
        *("--request-timeout", str(REQUEST_TIMEOUT_S)),
        *("--timeout-keep-alive", str(KEEP_ALIVE_S)),
        *("--max-connections", str(MAX_CONNECTIONS)),
    )
    yield proc
    stop_server(proc)


def connect(server: ServerProcess) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def trickle(sock: socket.socket, data: bytes) -> tuple[int, bytes]:
    """Send `data` one byte per second until the server answers or closes: (bytes sent, what
    the server sent back, b"" for a bare close)."""
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent : sent + 1])
        except OSError:  # reset: the server closed without a word
            return sent, b""
        sock.settimeout(1.0)
        try:
            return sent + 1, read_all(sock)
        except TimeoutError:
            continue
    return len(data), read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
        sock.settimeout(5.0)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> bytes:
    """One whole response on a kept-alive connection (headers and body may arrive apart)."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536)
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def status_and_error(reply: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_headers_sent_one_byte_per_second_get_a_408_and_the_connection_closes(
    slow_server: ServerProcess,
) -> None:
    with connect(slow_server) as sock:
        sent, reply = trickle(sock, HEADERS)
    assert sent <= REQUEST_TIMEOUT_S + 2 < len(HEADERS)
    status, error = status_and_error(reply)
    assert status == 408 and "--request-timeout" in str(error["message"])


def test_a_client_still_sending_when_answered_reads_the_whole_408(
    slow_server: ServerProcess,
) -> None:
    """The 408 goes out, then the server's end of the stream; what the client sends after it is
    read and dropped (a close with unread input would reset the connection, and the kernel
    would drop the queued answer)."""
    with connect(slow_server) as sock:
        sock.sendall(HEADERS[:20])
        time.sleep(REQUEST_TIMEOUT_S + 0.5)  # answered by now
        for _ in range(5):
            sock.sendall(HEADERS[20:40])
            time.sleep(0.05)
        status, error = status_and_error(read_all(sock))
    assert status == 408 and "--request-timeout" in str(error["message"])


def test_a_body_sent_one_byte_per_second_is_cut_off(slow_server: ServerProcess) -> None:
    with connect(slow_server) as sock:
        sock.sendall(HEADERS)
        sent, reply = trickle(sock, b"{" + b" " * 199)
    assert sent <= REQUEST_TIMEOUT_S + 2 < 200
    assert b"200 OK" not in reply
    assert slow_server.process.poll() is None


def test_an_idle_kept_alive_connection_is_closed(slow_server: ServerProcess) -> None:
    with connect(slow_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200")
        sock.settimeout(REQUEST_TIMEOUT_S * 10)
        assert sock.recv(65536) == b""  # closed by the server, nothing more sent


def test_a_connection_beyond_the_cap_gets_a_503_and_a_free_slot_serves_again(
    slow_server: ServerProcess,
) -> None:
    held = [connect(slow_server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has accepted them
        with connect(slow_server) as extra:
            status, error = status_and_error(read_all(extra))
        assert status == 503 and "too many open connections" in str(error["message"])
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with connect(slow_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200")
