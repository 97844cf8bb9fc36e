"""POST /v1/chat/completions (non-streaming) against the real engine on the demo model."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.server.conftest import MODEL, USER, AppFactory, asgi_client, chat_body

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


async def complete(http: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await http.post(CHAT, json=chat_body(**fields))
    assert response.status_code == 200, response.text
    return response.json()


async def prompt_tokens(http: httpx.AsyncClient, **fields: Any) -> int:
    return (await complete(http, max_tokens=1, **fields))["usage"]["prompt_tokens"]


async def tokenize_count(http: httpx.AsyncClient, **fields: Any) -> int:
    response = await http.post("/tokenize", json=fields)
    assert response.status_code == 200, response.text
    return response.json()["count"]


async def test_completion_has_the_openai_shape(client: httpx.AsyncClient) -> None:
    body = await complete(client, max_tokens=4)
    assert set(body) == {
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
        "seed",
    }
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    assert body["system_fingerprint"] == "winnow-0.1.0"
    assert isinstance(body["seed"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["message"]["refusal"] is None
    assert "tool_calls" not in choice["message"]
    assert choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]
    }


async def test_unknown_and_provider_fields_are_ignored(client: httpx.AsyncClient) -> None:
    extras = {
        "no_such_field": {"nested": [1, 2]},
        "store": True,
        "metadata": {"team": "x"},
        "user": "someone",
        "service_tier": "auto",
        "prediction": {"type": "content", "content": "x"},
        "modalities": ["text"],
        "reasoning_effort": "low",
        "parallel_tool_calls": True,
        "project_id": "p-1",
        "space_id": "s-1",
        "session_id": "sess-1",
        "repositories": ["org/repo"],
        "response_format": {"type": "text"},
    }
    plain = await complete(client, temperature=0, max_tokens=3, ignore_eos=True)
    with_extras = await complete(client, temperature=0, max_tokens=3, ignore_eos=True, **extras)
    assert with_extras["choices"][0]["message"] == plain["choices"][0]["message"]


async def test_system_prompt_is_a_leading_system_message(client: httpx.AsyncClient) -> None:
    system = {"role": "system", "content": "Be brief."}
    explicit = await prompt_tokens(client, messages=[system, *USER])
    via_field = await prompt_tokens(client, messages=USER, system_prompt="Be brief.")
    without = await prompt_tokens(client, messages=USER)
    assert via_field == explicit > without
    assert await tokenize_count(client, messages=USER, system_prompt="Be brief.") == explicit


async def test_system_prompt_merges_into_an_existing_system_message(
    client: httpx.AsyncClient,
) -> None:
    merged = [{"role": "system", "content": "Be brief.\n\nUse French."}, *USER]
    given = [{"role": "system", "content": "Use French."}, *USER]
    assert await tokenize_count(
        client, messages=given, system_prompt="Be brief."
    ) == await tokenize_count(client, messages=merged)


async def test_developer_role_is_treated_as_system(client: httpx.AsyncClient) -> None:
    as_system = await tokenize_count(client, messages=[{"role": "system", "content": "Hi."}, *USER])
    as_developer = await tokenize_count(
        client, messages=[{"role": "developer", "content": "Hi."}, *USER]
    )
    assert as_developer == as_system


async def test_text_parts_are_joined_with_newlines(client: httpx.AsyncClient) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = await tokenize_count(client, messages=[{"role": "user", "content": parts}])
    as_text = await tokenize_count(client, messages=[{"role": "user", "content": "first\nsecond"}])
    assert as_parts == as_text


async def test_x_request_id_is_echoed_and_used_in_the_id(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=chat_body(), headers={"X-Request-Id": "trace-42"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["id"] == "chatcmpl-trace-42"
    # the same id twice at once must not collide inside the engine
    again = await client.post(CHAT, json=chat_body(), headers={"X-Request-Id": "trace-42"})
    assert again.status_code == 200 and again.json()["id"] == "chatcmpl-trace-42"


async def test_a_random_request_id_is_made_when_none_or_an_unusable_one_is_sent(
    client: httpx.AsyncClient,
) -> None:
    for headers in ({}, {"X-Request-Id": "has spaces and / slashes"}):
        response = await client.post(CHAT, json=chat_body(), headers=headers)
        request_id = response.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        assert response.json()["id"] == f"chatcmpl-{request_id}"


async def test_errors_carry_the_request_id_too(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT, json=chat_body(temperature=9), headers={"X-Request-Id": "bad-1"}
    )
    assert response.status_code == 400 and response.headers["x-request-id"] == "bad-1"


async def test_max_completion_tokens_wins_over_max_tokens(client: httpx.AsyncClient) -> None:
    body = await complete(client, max_completion_tokens=2, max_tokens=5, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 2
    assert body["choices"][0]["finish_reason"] == "length"


async def test_seed_list_seeds_each_choice(client: httpx.AsyncClient) -> None:
    fields = {"temperature": 1.0, "max_tokens": 6, "ignore_eos": True}
    both = await complete(client, n=2, seed=[11, 22], **fields)
    assert both["seed"] == [11, 22]
    assert [choice["index"] for choice in both["choices"]] == [0, 1]
    assert both["usage"]["completion_tokens"] == 12
    for index, seed in enumerate([11, 22]):
        alone = await complete(client, seed=seed, **fields)
        assert alone["seed"] == seed
        assert both["choices"][index]["message"] == alone["choices"][0]["message"]


async def test_logprobs_objects(client: httpx.AsyncClient) -> None:
    body = await complete(client, logprobs=True, top_logprobs=2, max_tokens=3, ignore_eos=True)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert isinstance(entry["token"], str) and entry["logprob"] <= 0
        assert all(0 <= b < 256 for b in entry["bytes"])
        assert len(entry["top_logprobs"]) == 2
        assert all(set(top) == {"token", "logprob", "bytes"} for top in entry["top_logprobs"])


async def test_tools_reach_the_chat_template(client: httpx.AsyncClient) -> None:
    without = await prompt_tokens(client)
    with_tools = await prompt_tokens(client, tools=[WEATHER_TOOL])
    with_auto = await prompt_tokens(client, tools=[WEATHER_TOOL], tool_choice="auto")
    with_none = await prompt_tokens(client, tools=[WEATHER_TOOL], tool_choice="none")
    # "none" still shows the model its tools (as OpenAI and vLLM do); it only parses no calls
    assert with_tools == with_auto == with_none > without


async def test_multi_turn_tool_use_is_accepted(client: httpx.AsyncClient) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = await complete(client, messages=messages, tools=[WEATHER_TOOL])
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


async def test_model_field_reports_the_name_asked_for(make_app: AppFactory) -> None:
    async with asgi_client(make_app(served_model_names=["alpha", "beta"])) as http:
        assert (await complete(http, model="beta"))["model"] == "beta"
        assert (await complete(http, model=None))["model"] == "alpha"
        unknown = await http.post(CHAT, json=chat_body(model="gamma"))
        assert unknown.status_code == 404
    async with asgi_client(make_app(accept_any_model=True)) as http:
        assert (await complete(http, model="anything"))["model"] == MODEL


async def test_overloaded_engine_answers_429_with_retry_after(
    client: httpx.AsyncClient, engine: Any
) -> None:
    from winnow.engine.request import EngineOverloaded, GenerationRequest
    from winnow.sampling.params import SamplingParams

    prompt = engine.tokenizer.encode("fill the queue")
    filler_ids: list[str] = []
    try:
        with pytest.raises(EngineOverloaded):
            for i in range(1000):
                request = GenerationRequest(f"filler-{i}", prompt, SamplingParams(max_tokens=64))
                engine.submit(request)
                filler_ids.append(request.request_id)
        response = await client.post(CHAT, json=chat_body())
    finally:
        for request_id in filler_ids:
            engine.abort(request_id)
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1


async def test_the_openai_sdk_accepts_responses_in_strict_mode(make_app: AppFactory) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]
    sdk = AsyncOpenAI(
        base_url="http://winnow.test/v1",
        api_key="unused",
        # The SDK drives any httpx-compatible client; this one talks to the app in-process.
        http_client=asgi_client(make_app()),  # type: ignore[arg-type]
        _strict_response_validation=True,
        max_retries=0,
    )
    completion = await sdk.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, n=2, logprobs=True, top_logprobs=1
    )
    assert len(completion.choices) == 2
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    models = await sdk.models.list()
    assert [model.id for model in models.data] == [MODEL]
    await sdk.close()
