"""The SSE writer on its own: keep-alive comments while idle, and the error event + [DONE]
when the engine fails after the 200 went out. Driven by scripted delta sequences, no engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tests.server.conftest import sse_payloads
from winnow.engine.outputs import ChoiceDelta, RequestOutput
from winnow.engine.request import EngineDeadError
from winnow.server.chat import ChatChunkBuilder
from winnow.server.generation import ResponseMeta
from winnow.server.streaming import PING, sse_body, with_keepalive
from winnow.server.tool_calls import ToolPlan
from winnow.structured.tool_formats import tool_format

pytestmark = pytest.mark.anyio

META = ResponseMeta("chatcmpl-test", 1700000000, "demo", None)


def output(text: str, *, finished: bool = False) -> RequestOutput:
    delta = ChoiceDelta(0, text, [7], None, "stop" if finished else None, None)
    return RequestOutput("r", [delta], 3, 0, 1, finished, 5)


class ScriptedGeneration:
    """Stands in for server.generation.Generation: yields a script of deltas (with pauses until
    an event is set)."""

    def __init__(self, *steps: RequestOutput | asyncio.Event | BaseException) -> None:
        self.steps = steps
        self.closed = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        for step in self.steps:
            if isinstance(step, asyncio.Event):
                await step.wait()
            elif isinstance(step, BaseException):
                raise step
            else:
                yield step

    def close(self) -> None:
        self.closed = True


def events(generation: ScriptedGeneration, keepalive_s: float = 10.0) -> AsyncIterator[bytes]:
    no_tools = ToolPlan(tool_format("hermes", lambda _: None))
    builder = ChatChunkBuilder(META, include_usage=False, tools=no_tools)
    return sse_body(generation, builder, keepalive_s)  # type: ignore[arg-type]


async def collect_body(generation: ScriptedGeneration) -> bytes:
    return b"".join([event async for event in events(generation)])


async def test_pings_are_sent_while_the_engine_is_silent() -> None:
    released = asyncio.Event()
    generation = ScriptedGeneration(released, output("Hello", finished=True))
    body = events(generation, keepalive_s=0.01)
    assert [await anext(body), await anext(body)] == [PING, PING]
    released.set()
    rest = b"".join([event async for event in body])
    payloads = sse_payloads(rest)
    assert json.loads(payloads[0])["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1] == "[DONE]" and generation.closed


async def test_engine_death_mid_stream_sends_an_error_event_then_done() -> None:
    generation = ScriptedGeneration(output("Hel"), EngineDeadError("boom"))
    payloads = sse_payloads(await collect_body(generation))
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "service_unavailable"
    assert json.loads(payloads[1])["choices"][0]["delta"] == {"content": "Hel"}
    assert generation.closed


async def test_an_unexpected_failure_mid_stream_is_a_server_error_event() -> None:
    generation = ScriptedGeneration(output("Hel"), RuntimeError("bug"))
    payloads = sse_payloads(await collect_body(generation))
    assert json.loads(payloads[-2])["error"]["type"] == "server_error"


async def test_empty_deltas_without_logprobs_send_nothing() -> None:
    generation = ScriptedGeneration(output("A"), output(""), output("", finished=True))
    chunks = [json.loads(p) for p in sse_payloads(await collect_body(generation))[:-1]]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "A"}, {}]


async def test_keepalive_does_not_cancel_the_pending_item() -> None:
    released = asyncio.Event()

    async def slow() -> AsyncIterator[int]:
        await released.wait()
        yield 1
        yield 2

    stream = with_keepalive(slow(), 0.01)
    assert [await anext(stream), await anext(stream)] == [None, None]  # pings while it waits
    released.set()
    items = [item async for item in stream]
    assert [item for item in items if item is not None] == [1, 2]


# Every character str.splitlines() breaks at: \n and \r JSON escapes, the rest it may not.
SPLITLINES_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


async def test_every_event_is_one_line_for_line_splitting_clients() -> None:
    """Model text holding any character that str.splitlines() breaks at (httpx's iter_lines,
    many hand-written SSE readers) still arrives as one `data:` line per event, and the text
    decodes back exactly."""
    text = "a" + "b".join(SPLITLINES_BREAKS) + "c"
    raw = await collect_body(ScriptedGeneration(output(text, finished=True)))
    lines = [line for line in raw.decode().splitlines() if line]  # what httpx's iter_lines does
    assert all(line.startswith("data: ") for line in lines), lines
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == text
    assert lines[-1] == "data: [DONE]"
