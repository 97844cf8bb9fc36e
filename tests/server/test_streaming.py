"""SSE streaming: exact framing from raw bytes, usage chunks, and aborts on disconnect."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.server.conftest import (
    AppFactory,
    AsgiExchange,
    asgi_client,
    chat_body,
    drive_asgi,
    sse_chunks,
)

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"


async def stream(http: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    response = await http.post(CHAT, json=chat_body(stream=True, **fields))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response


def by_choice(chunks: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    choices: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for chunk in chunks:
        for choice in chunk["choices"]:
            choices[choice["index"]].append(choice)
    return choices


async def test_sse_framing_and_chunk_sequence(client: httpx.AsyncClient) -> None:
    response = await stream(
        client, max_tokens=5, ignore_eos=True, stream_options={"include_usage": True}
    )
    chunks = sse_chunks(response.content)
    first = chunks[0]
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {
        (first["id"], first["created"], "demo")
    }
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["system_fingerprint"] == "winnow-0.1.0" for c in chunks)
    [choice] = by_choice(chunks).values()
    assert choice[0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["delta"]) == {"content"} and c["delta"]["content"] for c in choice[1:-1])
    assert all(c["finish_reason"] is None for c in choice[:-1])
    assert choice[-1]["delta"] == {} and choice[-1]["finish_reason"] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["total_tokens"] == (
        usage_chunk["usage"]["prompt_tokens"] + usage_chunk["usage"]["completion_tokens"]
    )
    assert all("usage" not in c for c in chunks[:-1])


async def test_no_usage_chunk_unless_asked(client: httpx.AsyncClient) -> None:
    for options in (None, {"include_usage": False}):
        response = await stream(client, stream_options=options)
        chunks = sse_chunks(response.content)
        assert all(c["choices"] and "usage" not in c for c in chunks)


async def test_streamed_text_equals_the_non_streamed_text(client: httpx.AsyncClient) -> None:
    fields = {"max_tokens": 8, "temperature": 0}
    whole = (await client.post(CHAT, json=chat_body(**fields))).json()
    chunks = sse_chunks((await stream(client, **fields)).content)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]


async def test_every_choice_of_n_streams_role_content_finish(client: httpx.AsyncClient) -> None:
    fields = {"n": 3, "seed": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}
    chunks = sse_chunks((await stream(client, **fields)).content)
    assert all(len(c["choices"]) == 1 for c in chunks)
    choices = by_choice(chunks)
    assert sorted(choices) == [0, 1, 2]
    whole = (await client.post(CHAT, json=chat_body(**fields))).json()
    for index, events in choices.items():
        assert events[0]["delta"] == {"role": "assistant", "content": ""}
        assert events[-1]["delta"] == {} and events[-1]["finish_reason"] == "length"
        text = "".join(e["delta"].get("content", "") for e in events)
        assert text == whole["choices"][index]["message"]["content"]
    assert all(c["seed"] == [1, 2, 3] for c in chunks)


async def test_logprobs_ride_on_content_chunks(client: httpx.AsyncClient) -> None:
    response = await stream(client, max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=1)
    [events] = by_choice(sse_chunks(response.content)).values()
    positions = [entry for e in events if e["logprobs"] for entry in e["logprobs"]["content"]]
    assert len(positions) == 4
    assert all(len(p["top_logprobs"]) == 1 for p in positions)
    assert events[0]["logprobs"] is None and events[-1]["logprobs"] is None


async def test_stream_errors_before_the_200_are_plain_json_errors(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(CHAT, json=chat_body(stream=True, max_tokens=10**6))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


async def assert_engine_drained(app: FastAPI, engine: Any) -> None:
    """A new request completes, and afterwards nothing is left in the engine: no request, and
    every KV block free again (cached prefix blocks nobody holds count as free)."""
    async with asgi_client(app) as http:
        follow_up = await http.post(CHAT, json=chat_body(max_tokens=1))
    assert follow_up.status_code == 200
    stats = engine.stats()  # refreshed by the engine after the follow-up's last step
    assert (stats.running, stats.waiting, stats.num_requests) == (0, 0, 0)
    assert stats.kv_blocks_free == stats.kv_blocks_total


def first_content_chunk_sent(exchange: AsgiExchange) -> bool:
    payloads = [p for p in exchange.body.split(b"\n\n") if p.startswith(b"data: {")]
    return any(b'"content":"' in p and b'"role"' not in p for p in payloads)


async def test_disconnect_mid_stream_aborts_the_request(make_app: AppFactory, engine: Any) -> None:
    app = make_app()
    exchange = await drive_asgi(
        app,
        CHAT,
        chat_body(stream=True, max_tokens=200, ignore_eos=True),
        disconnect=asyncio.Event(),
        disconnect_when=first_content_chunk_sent,
    )
    assert exchange.status == 200
    assert b"[DONE]" not in exchange.body
    await assert_engine_drained(app, engine)


async def test_disconnect_while_waiting_for_a_whole_completion_aborts_it(
    make_app: AppFactory, engine: Any
) -> None:
    app = make_app()
    running = asyncio.Event()

    async def watch_engine() -> None:
        while engine.stats().running == 0:
            await asyncio.sleep(0.01)
        running.set()

    watcher = asyncio.ensure_future(watch_engine())
    exchange = await drive_asgi(
        app,
        CHAT,
        chat_body(max_tokens=200, ignore_eos=True),
        disconnect=running,
    )
    watcher.cancel()
    assert exchange.status != 200
    await assert_engine_drained(app, engine)
