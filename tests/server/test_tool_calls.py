"""One assembler of tool calls for both responses: the chunks of a stream add up to the message
of the whole response, and both follow OpenAI's rule for `content: null` (the message carries
tool calls and no text). Driven by scripted deltas in the Hermes format, no engine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from winnow.engine.outputs import ChoiceDelta, RequestOutput
from winnow.server.chat import ChatChunkBuilder, chat_choice
from winnow.server.generation import ChoiceResult, ResponseMeta
from winnow.server.tool_calls import ToolPlan
from winnow.structured.tool_formats import tool_format

META = ResponseMeta("chatcmpl-test", 1700000000, "demo", None)
PLAN = ToolPlan(tool_format("hermes", lambda _: None), parse=True)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'

# (the deltas of one choice, the content of the whole message, whether it calls a tool)
REPLIES: dict[str, tuple[list[str], str | None, bool]] = {
    "call only": (["<tool_", CALL.removeprefix("<tool_")], None, True),
    "text then call": (["Let me check. ", CALL], "Let me check.", True),
    "call then text": ([CALL, " Done."], " Done.", True),
    "text only": (["Hello", " there"], "Hello there", False),
    "empty": ([""], "", False),
}


def deltas(parts: list[str]) -> list[ChoiceDelta]:
    last = len(parts) - 1
    return [
        ChoiceDelta(0, text, [i], None, "stop" if i == last else None, None)
        for i, text in enumerate(parts)
    ]


def streamed_message(parts: list[str]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(first delta, the message the SDK accumulates from the chunks, finish_reason)."""
    builder = ChatChunkBuilder(META, include_usage=False, tools=PLAN)
    chunks = []
    for i, delta in enumerate(deltas(parts)):
        output = RequestOutput("r", [delta], 3, 0, i + 1, i == len(parts) - 1, 5)
        chunks.extend(builder.chunks(output))
    choices = [json.loads(chunk.model_dump_json())["choices"][0] for chunk in chunks]
    message: dict[str, Any] = {"content": None, "tool_calls": {}}
    for choice in choices:
        delta = choice["delta"]
        if delta.get("content") is not None:
            message["content"] = (message["content"] or "") + delta["content"]
        for call in delta.get("tool_calls") or []:
            held = message["tool_calls"].setdefault(call["index"], {"arguments": ""})
            held["name"] = call["function"].get("name") or held.get("name")
            held["arguments"] += call["function"]["arguments"]
    return choices[0]["delta"], message, choices[-1]["finish_reason"]


def whole_message(parts: list[str]) -> tuple[Any, str]:
    choice = ChoiceResult(0, list(parts), [[i] for i in range(len(parts))], [], "stop")
    result = chat_choice(choice, None, PLAN)
    return result.message, result.finish_reason


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_stream_and_whole_response_agree(name: str) -> None:
    parts, content, calls = REPLIES[name]
    first, streamed, stream_reason = streamed_message(parts)
    message, reason = whole_message(parts)
    assert message.content == content
    assert (message.tool_calls is not None) == calls
    assert reason == stream_reason == ("tool_calls" if calls else "stop")
    # The stream opens with content null exactly when the reply opens with a call.
    assert first["role"] == "assistant"
    assert first["content"] == (None if parts[0].startswith("<tool_") else "")
    # Accumulated like the SDK does, the chunks give the same message.
    assert streamed["content"] == message.content
    called = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    assert [(c["name"], c["arguments"]) for c in streamed["tool_calls"].values()] == called
    if calls:
        assert called == [("get_weather", '{"city": "Oslo"}')]
