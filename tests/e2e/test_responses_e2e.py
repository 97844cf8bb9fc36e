"""POST /v1/responses end to end: a real server on the demo model with a SQLite response store,
the OpenAI SDK in strict mode as the client (create, stream, parse, a function-tool round trip,
previous_response_id chains, retrieve / delete / input_items), the bad-input matrix, and the
stored responses surviving a restart. The module's last test restarts the server."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.e2e.conftest import ServerProcess, start_server, stop_server
from winnow.limits import MAX_INPUT_ITEMS

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": WEATHER_PARAMETERS,
    "strict": True,
}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("responses") / "store.sqlite3"


def serve(demo_model_dir: Path, store_path: Path, log_name: str) -> ServerProcess:
    log = store_path.parent / log_name
    return start_server(demo_model_dir, log, "--response-store", f"sqlite:///{store_path}")


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, store_path: Path) -> Iterator[ServerProcess]:
    proc = serve(demo_model_dir, store_path, "server.log")
    yield proc
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return server.client()


def stored_count(store_path: Path) -> int:
    with sqlite3.connect(store_path) as db:
        return int(db.execute("SELECT count(*) FROM winnow_responses").fetchone()[0])


def test_create_runs_the_chat_path(client: OpenAI) -> None:
    """Same prompt, seed and budget: the same text as chat completions (one request path)."""
    response = client.responses.create(
        model="demo",
        input="Hello there",
        max_output_tokens=12,
        temperature=1,
        extra_body={"seed": 7},
    )
    chat = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=12,
        temperature=1,
        seed=7,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.object == "response" and response.model == "demo"
    finished = chat.choices[0].finish_reason
    assert response.status == ("incomplete" if finished == "length" else "completed")
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.store is True


def test_stream_events_in_order(client: OpenAI) -> None:
    fields: Any = {"model": "demo", "input": "Tell me", "max_output_tokens": 10}
    fields["extra_body"] = {"seed": 3}
    with client.responses.stream(**fields) as stream:
        events = list(stream)
    # the SDK's get_final_response() wants `response.completed`; a reply cut short ends with
    # `response.incomplete`, whose response is as whole
    final = events[-1].response  # type: ignore[union-attr]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete" if final.status == "incomplete" else "response.completed",
    ]
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    whole = client.responses.create(**fields)
    assert deltas == final.output_text == whole.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_streamed_function_call(client: OpenAI) -> None:
    with client.responses.stream(
        model="demo",
        input="Weather in Oslo?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=80,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    [call] = function_calls(final)
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(pieces) == call.arguments
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [event.arguments for event in done] == [call.arguments]
    assert final.status == "completed"


class Forecast(BaseModel):
    city: Annotated[str, Field(max_length=12)]
    days: Annotated[int, Field(ge=1, le=7)]


def test_parse_with_a_pydantic_model(client: OpenAI) -> None:
    for seed in range(3):
        parsed = client.responses.parse(
            model="demo",
            input="Forecast for Oslo",
            text_format=Forecast,
            max_output_tokens=120,
            temperature=1,
            extra_body={"seed": seed},
        )
        assert parsed.status == "completed"
        assert isinstance(parsed.output_parsed, Forecast)


def function_calls(response: Any) -> list[Any]:
    calls = [item for item in response.output if item.type == "function_call"]
    for call in calls:
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    return calls


def tool_call(call: Any) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.call_id, "type": "function", "function": function}


def test_function_tool_round_trip_and_chain(server: ServerProcess, client: OpenAI) -> None:
    first = client.responses.create(
        model="demo",
        input="What is the weather in Oslo?",
        instructions="Answer briefly.",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=80,
        extra_body={"seed": 1},
    )
    [call] = function_calls(first)
    assert first.status == "completed" and call.call_id
    second = client.responses.create(
        model="demo",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=8,
        extra_body={"seed": 2},
    )
    assert second.previous_response_id == first.id
    assert second.output[0].type == "message"
    third = client.responses.create(
        model="demo", previous_response_id=second.id, input="Thanks!", max_output_tokens=4
    )
    # the continuation's prompt is the chat prompt of the whole conversation
    conversation = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call(call)]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Thanks!"},
    ]
    tokens = httpx.post(server.base_url + "/tokenize", json={"messages": conversation}).json()
    assert third.usage is not None and third.usage.input_tokens == tokens["count"]
    items = client.responses.input_items.list(third.id, order="asc").data
    kinds = [(item.type, getattr(item, "role", None)) for item in items]
    assert kinds == [
        ("message", "user"),
        ("function_call", None),
        ("function_call_output", None),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert items[1].call_id == items[2].call_id == call.call_id  # type: ignore[union-attr]
    newest_first = client.responses.input_items.list(third.id, limit=2).data
    assert [item.id for item in newest_first] == [items[4].id, items[3].id]
    assert client.responses.retrieve(third.id).model_dump() == third.model_dump()
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # the chain's later links keep their own copy of the conversation
    assert client.responses.retrieve(second.id).id == second.id


def test_continuation_reuses_the_cached_prefix(client: OpenAI) -> None:
    """A template that renders earlier turns in place: the continuation's prompt extends the
    previous one, whose full KV blocks (16 tokens) the prefix cache serves again."""
    question = "Please describe, in a few careful sentences, the weather one finds in Oslo " * 2
    first = client.responses.create(model="demo", input=question, max_output_tokens=4)
    second = client.responses.create(
        model="demo", previous_response_id=first.id, input="And Bergen?", max_output_tokens=2
    )
    assert first.usage is not None and second.usage is not None
    assert first.usage.input_tokens >= 32
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached >= 16 * (first.usage.input_tokens // 16)


def test_store_false_keeps_nothing(client: OpenAI, store_path: Path) -> None:
    before = stored_count(store_path)
    response = client.responses.create(model="demo", input="Hi", store=False, max_output_tokens=2)
    assert response.store is False
    assert stored_count(store_path) == before
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_unknown_previous_response_is_404(server: ServerProcess) -> None:
    reply = httpx.post(
        server.base_url + "/v1/responses",
        json={"input": "Hi", "previous_response_id": "resp_nope"},
    )
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["param"] == "previous_response_id"
    assert error["code"] == "previous_response_not_found"
    assert "resp_nope" in error["message"]


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"input": [{"type": "image_generation_call", "id": "x"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content"),
    (
        {"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
        "input[0].call_id",
    ),
    ({"input": [{"role": "user", "content": "x"}] * (MAX_INPUT_ITEMS + 1)}, "input"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "Hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    (
        {
            "input": "Hi",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}},
        },
        "text.format",
    ),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "Hi", "n": 2}, "n"),
]


@pytest.mark.parametrize(("body", "param"), BAD_INPUTS)
def test_bad_input_is_a_400_and_stores_nothing(
    server: ServerProcess, store_path: Path, body: dict[str, Any], param: str
) -> None:
    before = stored_count(store_path)
    reply = httpx.post(server.base_url + "/v1/responses", json={"model": "demo", **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert stored_count(store_path) == before


def test_stored_responses_survive_a_restart(
    server: ServerProcess, client: OpenAI, demo_model_dir: Path, store_path: Path
) -> None:
    kept = client.responses.create(model="demo", input="Remember me", max_output_tokens=4)
    stop_server(server)
    restarted = serve(demo_model_dir, store_path, "restarted.log")
    try:
        again = restarted.client()
        assert again.responses.retrieve(kept.id).model_dump() == kept.model_dump()
        follow_up = again.responses.create(
            model="demo", previous_response_id=kept.id, input="And now?", max_output_tokens=2
        )
        items = again.responses.input_items.list(follow_up.id, order="asc").data
        assert [item.id for item in items][:2] == [
            again.responses.input_items.list(kept.id).data[0].id,
            kept.output[0].id,
        ]
    finally:
        stop_server(restarted)
