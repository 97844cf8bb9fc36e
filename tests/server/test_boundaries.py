"""Boundary integers in every numeric field of both generation endpoints: each request gets a 4xx
naming the field or a correct answer, and the engine keeps serving. A value the sampler cannot
hold that still reaches the engine fails that one request, never the engine loop."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.server.conftest import MODEL, USER, sse_chunks

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BOUNDARIES = [2**31, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**300]


def value_fields(value: int) -> dict[str, dict[str, Any]]:
    """Where the value goes, per field: the fields of the request that put it there."""
    return {
        "temperature": {"temperature": value},
        "top_p": {"top_p": value},
        "top_k": {"top_k": value},
        "min_p": {"min_p": value},
        "xtc_probability": {"xtc_probability": value},
        "xtc_threshold": {"xtc_threshold": value},
        "repetition_penalty": {"repetition_penalty": value},
        "frequency_penalty": {"frequency_penalty": value},
        "presence_penalty": {"presence_penalty": value},
        "seed": {"seed": value},
        "seed-list": {"seed": [value]},
        "n": {"n": value},
        "max_tokens": {"max_tokens": value},
        "min_tokens": {"min_tokens": value, "max_tokens": None},
        "stop_token_ids": {"stop_token_ids": value},
        "stop_token_ids-list": {"stop_token_ids": [value]},
        "logit_bias-key": {"logit_bias": {str(value): 1}},
        "logit_bias-value": {"logit_bias": {"5": value}},
        "time_limit": {"time_limit": value},
    }


CHAT_ONLY = {
    "max_completion_tokens": lambda v: {"max_completion_tokens": v, "max_tokens": None},
    "top_logprobs": lambda v: {"logprobs": True, "top_logprobs": v},
}
COMPLETIONS_ONLY = {
    "logprobs": lambda v: {"logprobs": v},
    "best_of": lambda v: {"best_of": v},
    "prompt": lambda v: {"prompt": [1, v]},
}
FIELD_NAMES = sorted(value_fields(0))


def request_for(path: str, field: str, value: int) -> dict[str, Any]:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 2}
    base |= {"messages": USER} if path == CHAT else {"prompt": "Once upon"}
    extra = {**{k: lambda v, k=k: value_fields(v)[k] for k in FIELD_NAMES}, **CHAT_ONLY}
    if path == COMPLETIONS:
        extra = {**{k: lambda v, k=k: value_fields(v)[k] for k in FIELD_NAMES}, **COMPLETIONS_ONLY}
    fields = extra[field](value)
    return {k: v for k, v in (base | fields).items() if v is not None}


CASES = [(CHAT, f) for f in [*FIELD_NAMES, *CHAT_ONLY]] + [
    (COMPLETIONS, f) for f in [*FIELD_NAMES, *COMPLETIONS_ONLY]
]


def assert_answer_or_4xx(response: httpx.Response, field: str) -> None:
    body = response.json()
    if response.status_code == 200:
        assert body["choices"] and body["choices"][0]["finish_reason"] in ("stop", "length")
        return
    assert 400 <= response.status_code < 500, response.text
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    if error["code"] == "context_length_exceeded":  # OpenAI names the prompt for this one
        assert error["param"] in ("messages", "prompt"), body
    else:
        assert error["param"] == field.split("-")[0], body


async def assert_serves(client: httpx.AsyncClient) -> None:
    good = await client.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 2})
    assert good.status_code == 200, good.text
    assert good.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(("path", "field"), CASES, ids=[f"{p[4:]}-{f}" for p, f in CASES])
async def test_boundary_integers_get_a_4xx_or_an_answer(
    client: httpx.AsyncClient, engine: Any, path: str, field: str
) -> None:
    responses = await asyncio.gather(
        *(client.post(path, json=request_for(path, field, value)) for value in BOUNDARIES)
    )
    for response in responses:
        assert_answer_or_4xx(response, field)
    assert not engine.is_dead
    await assert_serves(client)


@pytest.mark.parametrize("value", [2**63, 2**63 - 1, 2**40])
async def test_min_tokens_beyond_the_context_is_a_400(
    client: httpx.AsyncClient, engine: Any, value: int
) -> None:
    """Issue 12's crash: chat without max_tokens, min_tokens >= 2**63 killed the engine thread."""
    response = await client.post(CHAT, json={"messages": USER, "min_tokens": value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "min_tokens"
    assert not engine.is_dead
    await assert_serves(client)


POISON_SEED = 424242


@pytest.fixture
def poisoned_sampler(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler refuses the row of any request seeded with POISON_SEED, as numpy refuses an
    integer it cannot hold; everything else is added as usual."""
    sampler = engine.engine.sampler
    add_row = sampler.add_row

    def refusing_add_row(key: int, params: Any, *args: Any, **kwargs: Any) -> None:
        if params.seed == POISON_SEED:
            raise OverflowError("Python int too large to convert to C long")
        add_row(key, params, *args, **kwargs)

    monkeypatch.setattr(sampler, "add_row", refusing_add_row)


@pytest.mark.usefixtures("poisoned_sampler")
async def test_a_request_the_sampler_refuses_fails_alone(
    client: httpx.AsyncClient, engine: Any
) -> None:
    good = {"model": MODEL, "messages": USER, "max_tokens": 6, "ignore_eos": True}
    poisoned = {**good, "seed": POISON_SEED}
    streamed = {**poisoned, "stream": True}
    responses = await asyncio.gather(
        client.post(CHAT, json=good),
        client.post(CHAT, json=poisoned),
        client.post(CHAT, json=streamed),
        client.post(CHAT, json={**good, "n": 2}),
    )
    ok, refused, refused_stream, ok_n2 = responses
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["type"] == "invalid_request_error"
    assert refused_stream.status_code == 200
    assert sse_chunks(refused_stream.content)[-1]["error"]["type"] == "invalid_request_error"
    for response, n in ((ok, 1), (ok_n2, 2)):
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 6 * n
    assert not engine.is_dead
    await assert_serves(client)
    stats = engine.stats()
    assert stats.num_requests == 0 and stats.kv_blocks_free == stats.kv_blocks_total


async def test_integral_floats_count_as_integers(client: httpx.AsyncClient) -> None:
    """JSON Schema counts 2.0 as an integer, so the API does too; 2.5 stays a 400."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 3.0, "n": 2.0, "seed": 7.0}
    response = await client.post(CHAT, json={**body, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 6
    assert response.json()["seed"] == 7
    refused = await client.post(CHAT, json={**body, "n": 2.5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"
