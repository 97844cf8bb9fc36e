"""Agent frameworks that reach Winnow through the Responses API by default: the OpenAI Agents
SDK (`Agent(model=...)` with its default model provider) running an agent with a function
tool, streamed and not, and pydantic-ai's default `openai:` provider with a tool and a
structured output. The demo model has random weights, so the tests force the first tool call
(the Agents SDK then resets tool_choice to auto, as it does by default) and check the loop:
the tool ran with schema-valid arguments, its output went back, the run finished."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from tests.e2e.conftest import ServerProcess

agents = pytest.importorskip("agents")
pydantic_ai = pytest.importorskip("pydantic_ai")


@pytest.fixture
def agents_client(server: ServerProcess) -> Iterator[None]:
    """A fresh client per test: each run has its own event loop."""
    client = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    agents.set_default_openai_client(client, use_for_tracing=False)
    agents.set_tracing_disabled(True)
    yield


@pytest.fixture(scope="module")
def eos_bias(demo_model_dir: Path) -> dict[str, int]:
    """Ends every free-text turn at once (a random-weight model would otherwise write until
    max_tokens, which the Agents SDK reports as an error); a grammar-held call is unaffected,
    since the grammar allows the end only after the call."""
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    return {str(tokenizer.eos_token_id): 100}


def weather_agent(cities: list[str], eos_bias: dict[str, int]) -> object:
    @agents.function_tool
    def get_weather(city: Annotated[str, Field(max_length=10)]) -> str:
        """The weather in a city."""
        cities.append(city)
        return "sunny"

    return agents.Agent(
        name="weather",
        instructions="Answer questions about the weather.",
        model="demo",
        tools=[get_weather],
        model_settings=agents.ModelSettings(
            tool_choice="required",
            max_tokens=120,
            temperature=1,
            extra_body={"seed": 5, "logit_bias": eos_bias},
        ),
    )


def test_agents_sdk_runs_a_tool(agents_client: None, eos_bias: dict[str, int]) -> None:
    cities: list[str] = []
    agent = weather_agent(cities, eos_bias)
    result = agents.Runner.run_sync(agent, "Weather in Oslo?", max_turns=4)
    assert cities and all(len(city) <= 10 for city in cities)
    assert isinstance(result.final_output, str)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]


def test_agents_sdk_streamed(agents_client: None, eos_bias: dict[str, int]) -> None:
    cities: list[str] = []

    async def run() -> tuple[object, list[str]]:
        agent = weather_agent(cities, eos_bias)
        result = agents.Runner.run_streamed(agent, "Weather in Oslo?", max_turns=4)
        kinds = [event.type async for event in result.stream_events()]
        return result, kinds

    result, kinds = asyncio.run(run())
    assert cities
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert isinstance(result.final_output, str)  # type: ignore[attr-defined]


class Forecast(BaseModel):
    city: Annotated[str, Field(max_length=10)]
    days: Annotated[int, Field(ge=1, le=7)]


def test_pydantic_ai_default_openai_provider(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`openai:NAME` is pydantic-ai's Responses model; a structured output makes every step a
    (strict) tool call: the function tool or the final_result output tool."""
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    cities: list[str] = []
    agent = pydantic_ai.Agent("openai:demo", output_type=Forecast)

    @agent.tool_plain
    def get_weather(city: Annotated[str, Field(max_length=10)]) -> str:
        """The weather in a city."""
        cities.append(city)
        return "sunny"

    settings = {"temperature": 1.0, "max_tokens": 80, "seed": 3}
    result = agent.run_sync(
        "Forecast for Oslo?",
        model_settings=settings,  # type: ignore[arg-type]
        usage_limits=pydantic_ai.UsageLimits(request_limit=12),
    )
    assert isinstance(result.output, Forecast)
