"""/v1/completions with a list of prompts, through the OpenAI SDK (strict) on the in-process app:
choice j of prompt i is index i*n + j, and each prompt runs exactly as it would alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types import Completion

from tests.server.conftest import MODEL, AppFactory

pytestmark = pytest.mark.anyio

PROMPTS = ["Once upon a time", "The river runs"]
FIELDS: dict[str, Any] = {"model": MODEL, "max_tokens": 3, "extra_body": {"ignore_eos": True}}


def sdk_client(http: httpx.AsyncClient, strict: bool = True) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url="http://winnow.test/v1",
        api_key="unused",
        http_client=http,
        _strict_response_validation=strict,
        max_retries=0,
    )


@pytest.fixture
async def http(make_app: AppFactory) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://winnow.test/v1") as client:
        yield client


@pytest.fixture
def sdk(http: httpx.AsyncClient) -> AsyncOpenAI:
    return sdk_client(http)


def texts(completion: Completion) -> list[str]:
    assert [choice.index for choice in completion.choices] == list(range(len(completion.choices)))
    return [choice.text for choice in completion.choices]


async def alone(sdk: AsyncOpenAI, prompt: str | list[int], **fields: Any) -> Completion:
    return await sdk.completions.create(prompt=prompt, **{**FIELDS, **fields})


async def test_choices_are_numbered_prompt_times_n_plus_choice(sdk: AsyncOpenAI) -> None:
    fields = {"n": 2, "seed": 11, "temperature": 1.0}
    batch = await sdk.completions.create(prompt=PROMPTS, **{**FIELDS, **fields})
    singles = [await alone(sdk, prompt, **fields) for prompt in PROMPTS]
    assert texts(batch) == texts(singles[0]) + texts(singles[1])
    assert texts(singles[0])[0] != texts(singles[0])[1]  # seeded choices differ: order matters
    assert all(choice.finish_reason == "length" for choice in batch.choices)
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles if s.usage)
    assert batch.usage.completion_tokens == 2 * 2 * 3
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + 12
    assert batch.model_extra is not None and batch.model_extra["seed"] == 11


async def test_token_id_prompts_batch_like_text(sdk: AsyncOpenAI) -> None:
    ids = [
        (await sdk.post("/../tokenize", body={"prompt": p}, cast_to=dict))["tokens"]  # type: ignore[arg-type]
        for p in PROMPTS
    ]
    by_ids = await sdk.completions.create(prompt=ids, temperature=0, **FIELDS)
    by_text = await sdk.completions.create(prompt=PROMPTS, temperature=0, **FIELDS)
    assert texts(by_ids) == texts(by_text)
    assert by_ids.usage is not None and by_text.usage is not None
    assert by_ids.usage.prompt_tokens == sum(len(i) for i in ids)


async def test_unseeded_batch_reports_the_seed_of_each_prompt(sdk: AsyncOpenAI) -> None:
    batch = await sdk.completions.create(prompt=PROMPTS, temperature=1.0, **FIELDS)
    assert batch.model_extra is not None
    seeds = batch.model_extra["seed"]
    assert isinstance(seeds, list) and len(seeds) == len(PROMPTS)
    for prompt, seed, text in zip(PROMPTS, seeds, texts(batch), strict=True):
        again = await alone(sdk, prompt, seed=seed, temperature=1.0)
        assert texts(again) == [text]


async def test_streamed_batch_equals_the_whole_response(
    sdk: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    fields = {"n": 2, "seed": 5, "temperature": 1.0}
    whole = await sdk.completions.create(prompt=PROMPTS, **{**FIELDS, **fields})
    # The SDK's Completion type requires a finish_reason, which text chunks (OpenAI's own too)
    # leave null: strict validation cannot read any completion stream.
    stream = await sdk_client(http, strict=False).completions.create(
        prompt=PROMPTS, stream=True, stream_options={"include_usage": True}, **{**FIELDS, **fields}
    )
    parts: dict[int, str] = {}
    finished: list[int] = []
    chunks = [chunk async for chunk in stream]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        parts[choice.index] = parts.get(choice.index, "") + choice.text
        if choice.finish_reason is not None:
            finished.append(choice.index)
    assert [parts[i] for i in range(4)] == texts(whole)
    assert sorted(finished) == [0, 1, 2, 3]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({chunk.id for chunk in chunks}) == 1
