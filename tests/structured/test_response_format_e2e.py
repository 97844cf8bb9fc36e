"""response_format through a real server with the official OpenAI SDK (strict validation)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import ServerProcess, start_server, stop_server

MESSAGES: Any = [{"role": "user", "content": "Describe a pet as JSON."}]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=30)
    vaccinated: bool


# what the SDK's `parse` sends (strict: no properties beyond the model's)
PET_SCHEMA = {**Pet.model_json_schema(), "additionalProperties": False}


@pytest.fixture(scope="module")
def server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("structured-server") / "server.log"
    proc = start_server(demo_model_dir, log_path, "--max-num-seqs", "8")
    yield proc
    stop_server(proc)


def test_parse_returns_the_pydantic_object(server: ServerProcess) -> None:
    completion = server.client().chat.completions.parse(
        model=server.model, messages=MESSAGES, response_format=Pet, seed=1, max_tokens=60
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet)
    assert Pet.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_streamed_json_schema_output_validates(server: ServerProcess) -> None:
    stream = server.client().chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True},
        },
        seed=2,
        max_tokens=60,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    Pet.model_validate_json(text)


def test_json_mode_gives_objects(server: ServerProcess) -> None:
    """JSON mode bounds no string, and a random model seldom closes one: of several choices,
    those that end are objects, and the rest are cut by max_tokens."""
    completion = server.client().chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        response_format={"type": "json_object"},
        seed=3,
        n=8,
        max_tokens=24,
    )
    ended = [c for c in completion.choices if c.finish_reason == "stop"]
    assert ended
    assert all(isinstance(json.loads(c.message.content or ""), dict) for c in ended)
    assert all((c.message.content or "").startswith("{") for c in completion.choices)


def test_completions_endpoint_takes_response_format(server: ServerProcess) -> None:
    completion = server.client().completions.create(
        model=server.model,
        prompt="A pet:",
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "pet", "schema": PET_SCHEMA},
            }
        },
        seed=4,
        max_tokens=60,
    )
    assert completion.choices[0].finish_reason == "stop"
    Pet.model_validate_json(completion.choices[0].text)


def test_truncated_output_raises_length_error(server: ServerProcess) -> None:
    with pytest.raises(openai.LengthFinishReasonError) as caught:
        server.client().chat.completions.parse(
            model=server.model, messages=MESSAGES, response_format=Pet, seed=1, max_tokens=3
        )
    content = caught.value.completion.choices[0].message.content or ""
    assert content.startswith('{"')  # the truncated text as generated, not repaired


def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "nonsense"}, "nonsense"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        (deep_schema(100), "deeper than"),
    ],
    ids=["invalid", "unsupported-keyword", "100-deep"],
)
def test_bad_schemas_are_400_naming_response_format(
    server: ServerProcess, schema: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(
            model=server.model,
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            max_tokens=5,
        )
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "response_format"
    assert named in error["message"]


def test_json_schema_type_needs_its_schema(server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(
            model=server.model,
            messages=MESSAGES,
            response_format={"type": "json_schema"},  # type: ignore[typeddict-item]
            max_tokens=5,
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "response_format"
