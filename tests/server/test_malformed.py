"""The malformed-input matrix (spec/reliability.md): every bad request gets a 4xx with the OpenAI
error body and the right `param`, nothing reaches a 5xx, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL, USER, AppFactory, asgi_client, chat_body

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
BODY_LIMIT = 64 * 1024
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}
FUNCTION = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
TOOL = {"type": "function", "function": FUNCTION}


@dataclass
class Case:
    id: str
    body: Any = None  # sent as JSON unless `raw` is given
    status: int = 400
    param: str | None = None
    code: str | None = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    path: str = CHAT
    method: str = "POST"


def chat(**fields: Any) -> dict[str, Any]:
    return chat_body(**fields)


def bad(id: str, param: str, **fields: Any) -> Case:
    """A chat request made invalid by `fields`; 400 naming `param`."""
    return Case(id, chat(**fields), param=param)


def message_case(id: str, messages: Any, param: str) -> Case:
    return Case(id, chat(messages=messages), param=param)


def raw_case(
    id: str, raw: bytes, content_type: str | None = "application/json", param: str | None = None
) -> Case:
    headers = {} if content_type is None else {"content-type": content_type}
    return Case(id, raw=raw, headers=headers, param=param)


CASES = [
    # sampling fields: ranges (spec/sampling.md) and types
    bad("temperature-negative", "temperature", temperature=-0.1),
    bad("temperature-above-2", "temperature", temperature=2.5),
    bad("temperature-string", "temperature", temperature="hot"),
    raw_case(
        "temperature-nan",
        b'{"messages":[{"role":"user","content":"x"}],"temperature":NaN}',
        param="temperature",
    ),
    bad("top-p-above-1", "top_p", top_p=1.5),
    bad("top-p-negative", "top_p", top_p=-0.1),
    bad("top-k-below-minus-1", "top_k", top_k=-2),
    bad("top-k-float", "top_k", top_k=1.5),
    bad("min-p-above-1", "min_p", min_p=2),
    bad("xtc-probability-negative", "xtc_probability", xtc_probability=-0.5),
    bad("xtc-threshold-above-1", "xtc_threshold", xtc_threshold=1.5),
    bad("repetition-penalty-zero", "repetition_penalty", repetition_penalty=0),
    bad("repetition-penalty-negative", "repetition_penalty", repetition_penalty=-1.0),
    bad("frequency-penalty-above-2", "frequency_penalty", frequency_penalty=2.5),
    bad("presence-penalty-below-minus-2", "presence_penalty", presence_penalty=-3),
    bad("logit-bias-id-over-vocab", "logit_bias", logit_bias={"99999999": 5}),
    bad("logit-bias-negative-id", "logit_bias", logit_bias={"-1": 5}),
    bad("logit-bias-non-numeric-value", "logit_bias", logit_bias={"5": "up"}),
    bad("logit-bias-non-numeric-key", "logit_bias", logit_bias={"abc": 1}),
    bad("logit-bias-not-object", "logit_bias", logit_bias=[1, 2]),
    bad("n-zero", "n", n=0),
    bad("n-huge", "n", n=10**6),
    bad("n-string", "n", n="2"),
    bad("max-tokens-zero", "max_tokens", max_tokens=0),
    bad("max-tokens-negative", "max_tokens", max_tokens=-5),
    bad("max-tokens-string", "max_tokens", max_tokens="ten"),
    bad("max-completion-tokens-zero", "max_completion_tokens", max_completion_tokens=0),
    bad("min-tokens-negative", "min_tokens", min_tokens=-1),
    bad("min-tokens-over-max", "min_tokens", min_tokens=5, max_tokens=3),
    bad("stop-empty-string", "stop", stop=""),
    bad("stop-list-with-empty", "stop", stop=["end", ""]),
    bad("stop-17-strings", "stop", stop=[f"s{i}" for i in range(17)]),
    bad("stop-number", "stop", stop=5),
    bad("stop-token-ids-negative", "stop_token_ids", stop_token_ids=[-1]),
    bad("stop-token-ids-over-vocab", "stop_token_ids", stop_token_ids=[99999999]),
    bad("eos-token-alias-strings", "eos_token", eos_token=["x"]),
    bad("logprobs-string", "logprobs", logprobs="yes"),
    bad("top-logprobs-21", "top_logprobs", logprobs=True, top_logprobs=21),
    bad("top-logprobs-without-logprobs", "top_logprobs", top_logprobs=2),
    bad("logprobs-mode-unknown", "logprobs_mode", logprobs_mode="cooked"),
    bad("time-limit-zero", "time_limit", time_limit=0),
    bad("time-limit-negative", "time_limit", time_limit=-5),
    bad("seed-string", "seed", seed="abc"),
    bad("seed-over-int64", "seed", seed=2**64),
    bad("seed-list-length-not-n", "seed", seed=[1, 2], n=3),
    bad("seed-list-without-n", "seed", seed=[1, 2]),
    bad("seed-list-of-strings", "seed", seed=["a"]),
    bad("ignore-eos-string", "ignore_eos", ignore_eos="no"),
    bad("stream-string", "stream", stream="yes"),
    bad("stream-options-without-stream", "stream_options", stream_options={"include_usage": True}),
    bad(
        "stream-options-bad-type",
        "stream_options.include_usage",
        stream=True,
        stream_options={"include_usage": "yes"},
    ),
    bad("system-prompt-number", "system_prompt", system_prompt=5),
    # messages
    message_case("messages-empty", [], "messages"),
    Case("messages-missing", {"model": MODEL}, param="messages"),
    message_case("messages-string", "hello", "messages"),
    message_case("message-not-object", ["hello"], "messages[0]"),
    message_case("message-null", [None], "messages[0]"),
    message_case("role-unknown", [{"role": "bot", "content": "x"}], "messages[0].role"),
    message_case("role-missing", [{"content": "x"}], "messages[0].role"),
    message_case(
        "content-image-part",
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        "messages[0].content",
    ),
    message_case(
        "content-audio-part",
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
        "messages[0].content",
    ),
    message_case(
        "content-nested-list",
        [{"role": "user", "content": [[{"type": "text", "text": "x"}]]}],
        "messages[0].content",
    ),
    message_case(
        "content-part-text-not-string",
        [{"role": "user", "content": [{"type": "text", "text": {"nested": "x"}}]}],
        "messages[0].content",
    ),
    message_case("content-object", [{"role": "user", "content": {"a": 1}}], "messages[0].content"),
    message_case("content-number", [{"role": "user", "content": 42}], "messages[0].content"),
    message_case("user-content-null", [{"role": "user", "content": None}], "messages[0]"),
    message_case(
        "tool-message-without-call-id",
        [*USER, {"role": "tool", "content": "sunny"}],
        "messages[1]",
    ),
    message_case(
        "tool-calls-on-user-message",
        [{"role": "user", "content": "x", "tool_calls": []}],
        "messages[0]",
    ),
    message_case(
        "assistant-tool-call-without-function",
        [*USER, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}],
        "messages[1].tool_calls[0].function",
    ),
    raw_case(
        "content-lone-surrogate",
        b'{"messages":[{"role":"user","content":"bad \\ud800 text"}]}',
        param="messages[0].content",
    ),
    # tools, tool_choice, response_format, chat_template_kwargs
    bad("tool-without-function", "tools[0].function", tools=[{"type": "function"}]),
    bad("tool-type-unknown", "tools[0].type", tools=[{"type": "retrieval", "function": FUNCTION}]),
    bad(
        "tool-name-with-spaces",
        "tools[0].function.name",
        tools=[{"type": "function", "function": {"name": "get weather"}}],
    ),
    bad(
        "tool-parameters-not-object",
        "tools[0].function.parameters",
        tools=[{"type": "function", "function": {"name": "f", "parameters": "string"}}],
    ),
    bad(
        "tool-parameters-invalid-schema",
        "tools[0].function.parameters",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
    ),
    bad("tool-names-duplicated", "tools", tools=[TOOL, TOOL]),
    bad("tools-not-list", "tools", tools=TOOL),
    bad(
        "tool-choice-names-missing-function",
        "tool_choice",
        tools=[TOOL],
        tool_choice={"type": "function", "function": {"name": "missing"}},
    ),
    bad("tool-choice-required-without-tools", "tool_choice", tool_choice="required"),
    bad(
        "tool-call-arguments-not-json",
        "messages[1].tool_calls[0].function.arguments",
        messages=[
            *USER,
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{x"}}
                ],
            },
        ],
    ),
    bad("tool-choice-unknown-string", "tool_choice", tool_choice="sometimes"),
    bad(
        "response-format-schema-unenforceable",
        "response_format",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
        },
    ),
    bad("response-format-unknown", "response_format.type", response_format={"type": "xml"}),
    bad(
        "chat-template-kwargs-template",
        "chat_template_kwargs",
        chat_template_kwargs={"chat_template": "{{ 7 * 7 }}"},
    ),
    bad("chat-template-kwargs-not-object", "chat_template_kwargs", chat_template_kwargs="x"),
    # model
    Case("model-unknown", chat(model="gpt-9"), status=404, param="model", code="model_not_found"),
    bad("model-number", "model", model=5),
    # context
    Case(
        "prompt-plus-max-tokens-over-context",
        chat(max_tokens=MAX_MODEL_LEN),
        param="messages",
        code="context_length_exceeded",
    ),
    Case(
        "prompt-alone-over-context",
        chat(messages=[{"role": "user", "content": "word " * MAX_MODEL_LEN}]),
        param="messages",
        code="context_length_exceeded",
    ),
    # the body itself
    raw_case("invalid-json", b'{"messages": [{"role": "user", "content": "x"}'),
    raw_case("json-array-body", b"[1, 2, 3]"),
    raw_case("json-string-body", b'"hello"'),
    raw_case("empty-body", b""),
    raw_case("invalid-utf8", b'{"messages":[{"role":"user","content":"\xff\xfe"}]}'),
    raw_case("content-type-text-plain", json.dumps(chat()).encode(), "text/plain"),
    raw_case("content-type-form", json.dumps(chat()).encode(), "application/x-www-form-urlencoded"),
    raw_case("content-type-missing", json.dumps(chat()).encode(), None),
    Case(
        "body-over-limit",
        chat(messages=[{"role": "user", "content": "x" * BODY_LIMIT}]),
        status=413,
    ),
    # routes
    Case("unknown-route", {}, status=404, path="/v1/chat/complete"),
    Case("unknown-route-get", status=404, path="/v2/models", method="GET"),
    Case("wrong-method", status=405, method="GET"),
    # the other POST routes
    Case("completion-prompt-missing", {"model": MODEL}, param="prompt", path="/v1/completions"),
    Case(
        "completion-token-id-over-vocab",
        {"model": MODEL, "prompt": [1, 99999999]},
        param="prompt",
        path="/v1/completions",
    ),
    Case(
        "completion-logprobs-21",
        {"model": MODEL, "prompt": "x", "logprobs": 21},
        param="logprobs",
        path="/v1/completions",
    ),
    Case(
        "completion-over-context",
        {"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN},
        param="prompt",
        code="context_length_exceeded",
        path="/v1/completions",
    ),
    Case(
        "completion-batched-prompts",
        {"model": MODEL, "prompt": ["a", "b"]},
        param="prompt",
        path="/v1/completions",
    ),
    Case(
        "tokenize-prompt-and-messages",
        {"prompt": "x", "messages": USER},
        param="prompt",
        path="/tokenize",
    ),
    Case("tokenize-neither", {}, param="prompt", path="/tokenize"),
    Case("detokenize-id-over-vocab", {"tokens": [99999999]}, param="tokens", path="/detokenize"),
    Case("detokenize-not-ints", {"tokens": ["a"]}, param="tokens[0]", path="/detokenize"),
]


def test_the_matrix_is_large_and_unique() -> None:
    assert len(CASES) >= 50
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.fixture
async def matrix_client(make_app: AppFactory) -> Any:
    async with asgi_client(make_app(max_request_bytes=BODY_LIMIT)) as http:
        yield http


async def send(http: httpx.AsyncClient, case: Case) -> httpx.Response:
    if case.raw is not None:
        return await http.request(case.method, case.path, content=case.raw, headers=case.headers)
    if case.body is None:
        return await http.request(case.method, case.path, headers=case.headers)
    return await http.request(case.method, case.path, json=case.body, headers=case.headers)


def assert_error(response: httpx.Response, case: Case) -> None:
    assert response.status_code == case.status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ERROR_TYPES[case.status]
    assert error["param"] == case.param
    assert error["code"] == case.code


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
async def test_bad_request_is_a_4xx_with_the_error_body(
    matrix_client: httpx.AsyncClient, case: Case
) -> None:
    assert_error(await send(matrix_client, case), case)


async def test_server_still_serves_after_the_whole_matrix_at_once(
    matrix_client: httpx.AsyncClient, engine: Any
) -> None:
    responses = await asyncio.gather(*(send(matrix_client, case) for case in CASES))
    for response, case in zip(responses, CASES, strict=True):
        assert_error(response, case)
    good = await matrix_client.post(CHAT, json=chat_body())
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["finish_reason"] in ("stop", "length")


async def test_a_chunked_body_over_the_limit_is_413(matrix_client: httpx.AsyncClient) -> None:
    """No Content-Length to refuse up front: the body is counted as it streams in."""

    async def body() -> AsyncIterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}]}'

    response = await matrix_client.post(
        CHAT, content=body(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, Case("chunked-over-limit", status=413))
