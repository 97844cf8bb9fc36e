"""Strict tools under tool_choice "auto": the demo model (random weights, Mistral tool format)
at temperature 1, pushed towards its call marker `[TOOL_CALLS]` with a logit bias so that most
replies make calls. With `strict: true` every call made is valid for its schema, in chat
completions and in the Responses API, streamed and not; without it, none is (the contrast that
shows the grammar doing the work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from tests.e2e.conftest import ServerProcess

PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
SEEDS = range(4)
N = 8
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def marker_bias(demo_model_dir: Path) -> dict[str, int]:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    return {str(tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")): 100}


def chat_tools(strict: bool) -> list[Any]:
    function = {"name": "get_weather", "parameters": PARAMETERS, "strict": strict}
    return [{"type": "function", "function": function}]


def valid(name: str, arguments: str) -> bool:
    try:
        jsonschema.validate(json.loads(arguments), PARAMETERS)
    except (ValueError, jsonschema.ValidationError):
        return False
    return name == "get_weather"


def chat_calls(client: OpenAI, bias: dict[str, int], strict: bool) -> list[bool]:
    """Per call made over SEEDS x N choices: whether it is valid."""
    verdicts = []
    for seed in SEEDS:
        completion = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=chat_tools(strict),
            tool_choice="auto",
            parallel_tool_calls=False,
            temperature=1,
            n=N,
            seed=seed,
            max_tokens=MAX_TOKENS,
            logit_bias=bias,
        )
        for choice in completion.choices:
            # one call, then the grammar ends the reply: never cut by max_tokens
            assert choice.finish_reason != "length" or not strict
            for call in choice.message.tool_calls or []:
                assert call.type == "function"
                verdicts.append(valid(call.function.name, call.function.arguments))
    return verdicts


def test_strict_tools_under_auto_always_validate(
    client: OpenAI, marker_bias: dict[str, int]
) -> None:
    strict = chat_calls(client, marker_bias, strict=True)
    assert len(strict) >= len(SEEDS) * N and all(strict)
    loose = chat_calls(client, marker_bias, strict=False)
    assert loose.count(True) == 0


def test_strict_auto_streamed_chat(client: OpenAI, marker_bias: dict[str, int]) -> None:
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=chat_tools(True),
        parallel_tool_calls=False,
        temperature=1,
        n=4,
        seed=11,
        max_tokens=MAX_TOKENS,
        logit_bias=marker_bias,
        stream=True,
    )
    calls: dict[tuple[int, int], list[str]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault((choice.index, delta.index), ["", ""])
                assert delta.function is not None
                entry[0] += delta.function.name or ""
                entry[1] += delta.function.arguments or ""
    assert len(calls) >= 4
    assert all(valid(name, arguments) for name, arguments in calls.values())


def responses_tool(strict: bool) -> Any:
    return {"type": "function", "name": "get_weather", "parameters": PARAMETERS, "strict": strict}


@pytest.mark.parametrize("stream", [False, True])
def test_strict_auto_in_responses(
    client: OpenAI, marker_bias: dict[str, int], stream: bool
) -> None:
    made = []
    for seed in SEEDS:
        fields: Any = {
            "model": "demo",
            "input": "Weather in Oslo?",
            "tools": [responses_tool(True)],
            "parallel_tool_calls": False,
            "temperature": 1,
            "max_output_tokens": MAX_TOKENS,
            "store": False,
            "extra_body": {"seed": seed, "logit_bias": marker_bias},
        }
        if stream:
            with client.responses.stream(**fields) as events:
                response = events.get_final_response()
        else:
            response = client.responses.create(**fields)
        made += [item for item in response.output if item.type == "function_call"]
    assert len(made) >= len(SEEDS)
    assert all(valid(call.name, call.arguments) for call in made)
