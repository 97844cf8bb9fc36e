"""/v1/models, /tokenize, /detokenize, /health, /v1/completions and the OpenAPI document."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.server.conftest import (
    MAX_MODEL_LEN,
    MODEL,
    USER,
    AppFactory,
    asgi_client,
    chat_body,
    sse_chunks,
)

pytestmark = pytest.mark.anyio


async def test_models_list_and_retrieve(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/v1/models")).json()
    assert listed["object"] == "list"
    [card] = listed["data"]
    assert set(card) == {"id", "object", "created", "owned_by", "max_model_len"}
    assert card["id"] == MODEL and card["object"] == "model"
    assert card["max_model_len"] == MAX_MODEL_LEN
    assert (await client.get(f"/v1/models/{MODEL}")).json() == card
    missing = await client.get("/v1/models/gpt-9")
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "model"


async def test_default_served_name_is_the_engine_model_and_names_may_hold_slashes(
    make_app: AppFactory, engine: Any
) -> None:
    async with asgi_client(make_app(served_model_names=[])) as http:
        ids = [card["id"] for card in (await http.get("/v1/models")).json()["data"]]
        assert ids == [engine.model_name]
        chat = await http.post("/v1/chat/completions", json=chat_body(model=engine.model_name))
        assert chat.status_code == 200
    async with asgi_client(make_app(served_model_names=["org/model-7b", MODEL])) as http:
        card = (await http.get("/v1/models/org/model-7b")).json()
        assert card["id"] == "org/model-7b"


async def test_tokenize_and_detokenize_round_trip(client: httpx.AsyncClient) -> None:
    text = "Hello world, how are you?"
    tokenized = (await client.post("/tokenize", json={"prompt": text})).json()
    assert set(tokenized) == {"count", "max_model_len", "tokens"}
    assert tokenized["count"] == len(tokenized["tokens"]) > 0
    assert tokenized["max_model_len"] == MAX_MODEL_LEN
    plain = await client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert plain.json()["count"] == tokenized["count"] - 1  # no BOS
    detokenized = await client.post("/detokenize", json={"tokens": tokenized["tokens"]})
    assert detokenized.json() == {"prompt": text}


async def test_tokenize_messages_counts_the_chat_prompt(client: httpx.AsyncClient) -> None:
    counted = (await client.post("/tokenize", json={"messages": USER, "model": MODEL})).json()
    chat = (await client.post("/v1/chat/completions", json=chat_body())).json()
    assert counted["count"] == chat["usage"]["prompt_tokens"]


async def test_health_follows_the_engine(client: httpx.AsyncClient, engine: Any) -> None:
    for path in ("/health", "/readyz"):
        response = await client.get(path)
        assert response.status_code == 200 and engine.is_ready
        assert response.json() == {"status": "ok"}
    live = await client.get("/livez")
    assert live.status_code == 200 and live.json() == {"status": "alive", "state": "ready"}


async def test_an_engine_that_is_not_ready_answers_503(
    make_app: AppFactory, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the engine loads, or after its loop died, /health and work answer 503."""
    monkeypatch.setattr(type(engine), "is_ready", property(lambda self: False))
    async with asgi_client(make_app()) as http:
        health = await http.get("/health")
        ready = await http.get("/readyz")
        chat = await http.post("/v1/chat/completions", json=chat_body())
        live = await http.get("/livez")
    assert live.status_code == 200 and live.json()["state"] == "loading"
    for response in (health, ready, chat):
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable"
        assert int(response.headers["retry-after"]) >= 1


async def test_text_completion(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    [choice] = body["choices"]
    assert set(choice) >= {"index", "text", "logprobs", "finish_reason"}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] == 3


async def test_text_completion_defaults_to_16_tokens_and_takes_token_ids(
    client: httpx.AsyncClient,
) -> None:
    ids = (await client.post("/tokenize", json={"prompt": "Once upon a time"})).json()["tokens"]
    for prompt in (ids, [ids]):
        response = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "ignore_eos": True}
        )
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == 16


async def test_text_completion_logprobs_use_the_legacy_layout(client: httpx.AsyncClient) -> None:
    body = (
        await client.post(
            "/v1/completions",
            json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "logprobs": 2},
        )
    ).json()
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 3
    assert len(logprobs["text_offset"]) == 3 and logprobs["text_offset"][0] == 0
    assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"])


async def test_text_completion_stream(client: httpx.AsyncClient) -> None:
    fields = {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    whole = (await client.post("/v1/completions", json=fields)).json()
    response = await client.post(
        "/v1/completions",
        json={**fields, "stream": True, "stream_options": {"include_usage": True}},
    )
    chunks = sse_chunks(response.content)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(choice["text"] for c in chunks for choice in c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_openapi_document_describes_the_request_schemas(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "ChatMessage"} <= set(schemas)
    assert "/v1/chat/completions" in document["paths"]
