"""The server room's fixtures: one real AsyncEngine on the demo model for the whole session,
driven in-process through the ASGI app (no sockets).

Every test here is async (anyio, asyncio backend, one event loop for the session), because the
engine thread hands its outputs to the loop it was started in.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message, Scope

from winnow.config import EngineConfig, ServerConfig
from winnow.engine.async_engine import AsyncEngine
from winnow.server.app import build_app

MODEL = "demo"
MAX_MODEL_LEN = 256
KEEPALIVE_S = 0.05
USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
async def engine(demo_model_dir: Path) -> AsyncIterator[AsyncEngine]:
    engine = AsyncEngine.from_config(
        EngineConfig(
            model=str(demo_model_dir),
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=8,
            max_queue=8,
            kv_cache_memory_gib=0.25,
            max_n=4,
        )
    )
    engine.start()
    yield engine
    engine.shutdown()


AppFactory = Callable[..., FastAPI]


@pytest.fixture
def make_app(engine: AsyncEngine) -> AppFactory:
    """build_app over the session engine; keyword arguments override ServerConfig fields."""

    def make(**overrides: Any) -> FastAPI:
        config = ServerConfig(**{"served_model_names": [MODEL], **overrides})
        return build_app(engine, config, keepalive_s=KEEPALIVE_S)

    return make


def asgi_client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://winnow.test")


@pytest.fixture
async def client(make_app: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(make_app()) as http:
        yield http


def chat_body(**fields: Any) -> dict[str, Any]:
    """A small valid chat request; `fields` override or add to it."""
    return {"model": MODEL, "messages": USER, "max_tokens": 3, **fields}


def sse_payloads(raw: bytes) -> list[str]:
    """The data payloads of an SSE body, asserting the exact framing on the way: every event is
    `data: <one line>` + blank line (comments allowed), and `data: [DONE]` comes last."""
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = text.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        if event.startswith(":"):
            assert event == ": ping"
            continue
        assert event.startswith("data: ") and "\n" not in event and "\r" not in event, event
        payloads.append(event[len("data: ") :])
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads


def sse_chunks(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(payload) for payload in sse_payloads(raw)[:-1]]


@dataclass
class AsgiExchange:
    """One request driven straight through the ASGI interface, so a test can disconnect."""

    status: int | None = None
    body: bytearray = field(default_factory=bytearray)


async def drive_asgi(
    app: FastAPI,
    path: str,
    payload: dict[str, Any],
    *,
    disconnect: asyncio.Event,
    disconnect_when: Callable[[AsgiExchange], bool] = lambda _: False,
    timeout_s: float = 30.0,
) -> AsgiExchange:
    """POST `payload`; the client disconnects once `disconnect` is set, which happens at the
    latest when `disconnect_when` holds after the app sent something."""
    exchange = AsgiExchange()
    data = json.dumps(payload).encode()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            exchange.status = message["status"]
        elif message["type"] == "http.response.body":
            exchange.body += message.get("body", b"")
        if disconnect_when(exchange):
            disconnect.set()

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"winnow.test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("winnow.test", 80),
        "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), timeout_s)
    return exchange
