"""Tool calls end to end: a real server on the random-weight demo model (Mistral tool format,
detected from its template), the OpenAI SDK in strict mode as the client.

Forced calls (`required`, a named function, `parallel_tool_calls: false`) must come out as valid
calls at temperature 1 whatever the weights say; a stream must accumulate to the same reply."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion

from tests.e2e.conftest import ServerProcess

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
SCHEMAS = {
    "get_weather": WEATHER_PARAMETERS,
    "get_time": {"type": "object", "additionalProperties": False},
}
MESSAGES: list[Any] = [{"role": "user", "content": "What's the weather in Oslo?"}]
# Enough for a few calls with a 10-character city; a budget that runs out shows as "length".
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return server.client()


def forced(client: OpenAI, seed: int, **fields: Any) -> ChatCompletion:
    return client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        tools=TOOLS,
        temperature=1,
        seed=seed,
        n=4,
        max_tokens=MAX_TOKENS,
        **fields,
    )


def checked_calls(completion: ChatCompletion) -> list[list[tuple[str, dict[str, Any]]]]:
    """Per choice, its calls; each must be a listed tool with arguments valid for its schema."""
    replies = []
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        calls = choice.message.tool_calls or []
        ids = [call.id for call in calls]
        assert len(set(ids)) == len(ids)
        reply = []
        for call in calls:
            assert call.type == "function"
            assert len(call.id) == 9 and call.id.isalnum()  # the Mistral format's ids
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, SCHEMAS[call.function.name])
            reply.append((call.function.name, arguments))
        replies.append(reply)
    return replies


@pytest.mark.parametrize("seed", [0])
def test_required_gives_valid_calls(client: OpenAI, seed: int) -> None:
    for reply in checked_calls(forced(client, seed, tool_choice="required")):
        assert len(reply) >= 1


@pytest.mark.parametrize("seed", [0])
def test_required_without_parallel_calls_gives_one(client: OpenAI, seed: int) -> None:
    completion = forced(client, seed, tool_choice="required", parallel_tool_calls=False)
    for reply in checked_calls(completion):
        assert len(reply) == 1


@pytest.mark.parametrize("seed", [0])
def test_named_function_is_called_once(client: OpenAI, seed: int) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for reply in checked_calls(forced(client, seed, tool_choice=choice)):
        assert [name for name, _ in reply] == ["get_weather"]


def test_stream_accumulates_to_the_whole_reply(client: OpenAI) -> None:
    fields: dict[str, Any] = {
        "model": "demo",
        "messages": MESSAGES,
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 1,
        "seed": 7,
        "max_tokens": MAX_TOKENS,
    }
    whole = client.chat.completions.create(**fields)
    with client.chat.completions.stream(**fields) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        streamed = stream.get_final_completion()

    def calls(completion: ChatCompletion) -> list[tuple[str, str]]:
        message = completion.choices[0].message
        return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]

    assert checked_calls(whole) and calls(streamed) == calls(whole)
    assert streamed.choices[0].message.content is None
    assert streamed.choices[0].finish_reason == "tool_calls"

    # OpenAI's framing: per call one delta with id, type and name (arguments ""), then only
    # argument pieces; indices contiguous from 0; the finish_reason on a last, empty delta.
    opened: list[int] = []
    for chunk in chunks:
        for call in chunk.choices[0].delta.tool_calls or []:
            if call.id is not None:
                assert call.index == len(opened)
                assert call.type == "function" and call.function and call.function.name
                assert call.function.arguments == ""
                opened.append(call.index)
            else:
                assert call.index == opened[-1] and call.type is None
                assert call.function and call.function.name is None
                assert call.function.arguments
    assert len(opened) == len(calls(whole))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices[0].delta.tool_calls is None


def test_calls_go_back_into_the_conversation(client: OpenAI) -> None:
    """The assistant's calls (content null) and the tool results render in the next turn."""
    first = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        seed=3,
        max_tokens=MAX_TOKENS,
    )
    message = first.choices[0].message
    assert message.tool_calls
    history: list[Any] = [
        *MESSAGES,
        message.model_dump(exclude_none=True),
        *[
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
            for call in message.tool_calls
        ],
    ]
    assert history[1].get("content") is None
    second = client.chat.completions.create(
        model="demo", messages=history, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens
