"""The malformed-input matrix (docs/errors-and-limits.md): every bad request gets a 4xx with the
OpenAI error body and the right `param`, nothing reaches a 5xx, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL, USER, AppFactory, asgi_client, chat_body
from winnow.limits import (
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_MESSAGES,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_TOKEN_IDS,
)
from winnow.server.json_body import MAX_JSON_DEPTH

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
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


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon", "max_tokens": 3, **fields}


def bad(id: str, param: str, **fields: Any) -> Case:
    """A chat request made invalid by `fields`; 400 naming `param`."""
    return Case(id, chat(**fields), param=param)


def message_case(id: str, messages: Any, param: str) -> Case:
    return Case(id, chat(messages=messages), param=param)


def raw_case(
    id: str,
    raw: bytes,
    content_type: str | None = "application/json",
    param: str | None = None,
    path: str = CHAT,
) -> Case:
    headers = {} if content_type is None else {"content-type": content_type}
    return Case(id, raw=raw, headers=headers, param=param, path=path)


def shared(id: str, param: str, **fields: Any) -> list[Case]:
    """A field both endpoints take, made invalid by `fields`: one case per endpoint."""
    return [
        Case(f"chat-{id}", chat(**fields), param=param),
        Case(f"completion-{id}", completion(**fields), param=param, path=COMPLETIONS),
    ]


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


# Fields both endpoints take: each case runs against both (ranges, types, caps).
SHARED = [
    case
    for cases in (
        shared("temperature-negative", "temperature", temperature=-0.1),
        shared("temperature-above-2", "temperature", temperature=2.5),
        shared("temperature-string", "temperature", temperature="hot"),
        shared("temperature-bool", "temperature", temperature=True),
        shared("temperature-2-pow-64", "temperature", temperature=2**64),
        shared("top-p-above-1", "top_p", top_p=1.5),
        shared("top-p-negative", "top_p", top_p=-0.1),
        shared("top-k-below-minus-1", "top_k", top_k=-2),
        shared("top-k-float", "top_k", top_k=1.5),
        shared("top-k-2-pow-63", "top_k", top_k=2**63),
        shared("min-p-above-1", "min_p", min_p=2),
        shared("xtc-probability-negative", "xtc_probability", xtc_probability=-0.5),
        shared("xtc-threshold-above-1", "xtc_threshold", xtc_threshold=1.5),
        shared("repetition-penalty-zero", "repetition_penalty", repetition_penalty=0),
        shared("repetition-penalty-negative", "repetition_penalty", repetition_penalty=-1.0),
        shared("frequency-penalty-above-2", "frequency_penalty", frequency_penalty=2.5),
        shared("presence-penalty-below-minus-2", "presence_penalty", presence_penalty=-3),
        shared("logit-bias-id-over-vocab", "logit_bias", logit_bias={"99999999": 5}),
        shared("logit-bias-id-over-int64", "logit_bias", logit_bias={str(2**64): 5}),
        shared("logit-bias-negative-id", "logit_bias", logit_bias={"-1": 5}),
        shared("logit-bias-non-numeric-value", "logit_bias", logit_bias={"5": "up"}),
        shared("logit-bias-non-numeric-key", "logit_bias", logit_bias={"abc": 1}),
        shared("logit-bias-not-object", "logit_bias", logit_bias=[1, 2]),
        shared("logit-bias-above-100", "logit_bias", logit_bias={"5": 100.5}),
        shared("logit-bias-below-minus-100", "logit_bias", logit_bias={"5": -101}),
        shared(
            "logit-bias-too-many-entries",
            "logit_bias",
            logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)},
        ),
        shared("n-zero", "n", n=0),
        shared("n-huge", "n", n=10**6),
        shared("n-string", "n", n="2"),
        shared("n-over-max-n", "n", n=5),
        shared("n-2-pow-63", "n", n=2**63),
        shared("max-tokens-zero", "max_tokens", max_tokens=0),
        shared("max-tokens-negative", "max_tokens", max_tokens=-5),
        shared("max-tokens-string", "max_tokens", max_tokens="ten"),
        shared("max-tokens-2-pow-64", "max_tokens", max_tokens=2**64),
        shared("min-tokens-negative", "min_tokens", min_tokens=-1),
        shared("min-tokens-over-max", "min_tokens", min_tokens=5, max_tokens=3),
        shared("min-tokens-2-pow-63", "min_tokens", min_tokens=2**63),
        shared("stop-empty-string", "stop", stop=""),
        shared("stop-list-with-empty", "stop", stop=["end", ""]),
        shared("stop-17-strings", "stop", stop=[f"s{i}" for i in range(17)]),
        shared("stop-number", "stop", stop=5),
        shared("stop-string-too-long", "stop", stop="x" * (MAX_STOP_STRING_CHARS + 1)),
        shared("stop-list-string-too-long", "stop", stop=["y" * (MAX_STOP_STRING_CHARS + 1)]),
        shared("stop-token-ids-negative", "stop_token_ids", stop_token_ids=[-1]),
        shared("stop-token-ids-over-vocab", "stop_token_ids", stop_token_ids=[99999999]),
        shared("stop-token-id-over-int64", "stop_token_ids", stop_token_ids=2**64),
        shared("stop-token-ids-strings", "stop_token_ids", stop_token_ids=["5"]),
        shared(
            "stop-token-ids-too-many",
            "stop_token_ids",
            stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)),
        ),
        shared("eos-token-alias-strings", "eos_token", eos_token=["x"]),
        shared("logprobs-mode-unknown", "logprobs_mode", logprobs_mode="cooked"),
        shared("time-limit-zero", "time_limit", time_limit=0),
        shared("time-limit-negative", "time_limit", time_limit=-5),
        shared("time-limit-string", "time_limit", time_limit="1s"),
        shared("seed-string", "seed", seed="abc"),
        shared("seed-over-int64", "seed", seed=2**64),
        shared("seed-under-int64", "seed", seed=-(2**63) - 1),
        shared("seed-list-length-not-n", "seed", seed=[1, 2], n=3),
        shared("seed-list-without-n", "seed", seed=[1, 2]),
        shared("seed-list-of-strings", "seed", seed=["a"]),
        shared("ignore-eos-string", "ignore_eos", ignore_eos="no"),
        shared("ignore-eos-int", "ignore_eos", ignore_eos=1),
        shared(
            "include-stop-str-string", "include_stop_str_in_output", include_stop_str_in_output="y"
        ),
        shared("stream-string", "stream", stream="yes"),
        shared(
            "stream-options-without-stream",
            "stream_options",
            stream_options={"include_usage": True},
        ),
        shared(
            "stream-options-bad-type",
            "stream_options.include_usage",
            stream=True,
            stream_options={"include_usage": "yes"},
        ),
        shared("model-number", "model", model=5),
        shared("deep-nesting-in-ignored-field", "user", user=nested(MAX_JSON_DEPTH + 1)),
    )
    for case in cases
]

CASES = [
    *SHARED,
    # chat-only fields
    bad("max-completion-tokens-zero", "max_completion_tokens", max_completion_tokens=0),
    bad("max-completion-tokens-2-pow-63", "max_completion_tokens", max_completion_tokens=2**63),
    bad("logprobs-string", "logprobs", logprobs="yes"),
    bad("top-logprobs-21", "top_logprobs", logprobs=True, top_logprobs=21),
    bad("top-logprobs-negative", "top_logprobs", logprobs=True, top_logprobs=-1),
    bad("top-logprobs-without-logprobs", "top_logprobs", top_logprobs=2),
    bad("min-tokens-beyond-context", "min_tokens", min_tokens=2**63 - 1, max_tokens=None),
    raw_case(
        "temperature-nan",
        b'{"messages":[{"role":"user","content":"x"}],"temperature":NaN}',
        param="temperature",
    ),
    raw_case(
        "time-limit-infinity",
        b'{"messages":[{"role":"user","content":"x"}],"time_limit":Infinity}',
        param="time_limit",
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
    bad(
        "chat-template-kwargs-nested-480-deep",
        "chat_template_kwargs",
        chat_template_kwargs={"x": nested(480)},
    ),
    bad(
        "tool-parameters-nested-100-deep",
        "tools",
        tools=[{"type": "function", "function": {"name": "f", "parameters": nested_schema(50)}}],
    ),
    message_case(
        "content-parts-nested-deep", [{"role": "user", "content": nested(70)}], "messages"
    ),
    # model
    Case("model-unknown", chat(model="gpt-9"), status=404, param="model", code="model_not_found"),
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
        "completion-empty-prompt-list",
        {"model": MODEL, "prompt": []},
        param="prompt",
        path="/v1/completions",
    ),
    Case(
        "completion-empty-token-list-in-batch",
        {"model": MODEL, "prompt": [[1, 2], []]},
        param="prompt",
        path="/v1/completions",
    ),
    Case(
        "completion-batch-token-id-over-vocab",
        {"model": MODEL, "prompt": [[1], [99999999]]},
        param="prompt",
        path="/v1/completions",
    ),
    Case(
        "completion-batch-mixes-text-and-ids",
        {"model": MODEL, "prompt": ["a", [1, 2]]},
        param="prompt",
        path="/v1/completions",
    ),
    Case(
        "completion-batch-never-admitted",
        {"model": MODEL, "prompt": ["a"] * 9, "n": 2},
        param="prompt",
        path="/v1/completions",
    ),
    raw_case(
        "completion-lone-surrogate-in-key",
        b'{"prompt":"x","user":{"\\ud800":1}}',
        param="user",
        path=COMPLETIONS,
    ),
    raw_case(
        "completion-lone-surrogate-in-prompt",
        b'{"prompt":"bad \\udfff text"}',
        param="prompt",
        path=COMPLETIONS,
    ),
    raw_case("completion-invalid-json", b'{"prompt": "x"', path=COMPLETIONS),
    raw_case("completion-json-array-body", b'["x"]', path=COMPLETIONS),
    raw_case(
        "completion-content-type-text-plain",
        json.dumps(completion()).encode(),
        "text/plain",
        path=COMPLETIONS,
    ),
    raw_case(
        "completion-nested-beyond-the-json-parser",
        b'{"prompt": "x", "user": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        path=COMPLETIONS,
    ),
    Case(
        "completion-body-over-limit",
        completion(prompt="x" * BODY_LIMIT),
        status=413,
        path=COMPLETIONS,
    ),
    Case(
        "completion-model-unknown",
        completion(model="gpt-9"),
        status=404,
        param="model",
        code="model_not_found",
        path=COMPLETIONS,
    ),
    *(
        Case(f"completion-{id}", completion(**fields), param=param, path=COMPLETIONS)
        for id, param, fields in [
            ("prompt-null", "prompt", {"prompt": None}),
            ("prompt-number", "prompt", {"prompt": 5}),
            ("prompt-object", "prompt", {"prompt": {"text": "x"}}),
            ("prompt-empty-list", "prompt", {"prompt": []}),
            ("prompt-floats", "prompt", {"prompt": [1.5, 2.5]}),
            ("prompt-negative-token", "prompt", {"prompt": [1, -1]}),
            ("prompt-token-over-int64", "prompt", {"prompt": [1, 2**64]}),
            ("prompt-mixed-list", "prompt", {"prompt": ["a", 1]}),
            ("prompt-nested-deep", "prompt", {"prompt": nested(MAX_JSON_DEPTH + 5)}),
            ("logprobs-negative", "logprobs", {"logprobs": -1}),
            ("logprobs-bool", "logprobs", {"logprobs": True}),
            ("logprobs-string", "logprobs", {"logprobs": "5"}),
            ("logprobs-2-pow-63", "logprobs", {"logprobs": 2**63}),
            ("echo-not-supported", "echo", {"echo": True}),
            ("echo-string", "echo", {"echo": "yes"}),
            ("suffix-not-supported", "suffix", {"suffix": "end"}),
            ("suffix-number", "suffix", {"suffix": 5}),
            ("best-of-zero", "best_of", {"best_of": 0}),
            ("best-of-not-n", "best_of", {"best_of": 3}),
            ("best-of-2-pow-64", "best_of", {"best_of": 2**64}),
            ("min-tokens-over-default-max", "min_tokens", {"min_tokens": 17, "max_tokens": None}),
        ]
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
    assert len(CASES) >= 150
    assert sum(case.path == COMPLETIONS for case in CASES) >= 75
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


async def test_n_that_can_never_be_admitted_is_a_400_not_a_429(
    client: httpx.AsyncClient, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for 3 sequences running and queued: n=4 would wait forever, so it is refused."""
    monkeypatch.setattr(engine.engine.config, "max_num_seqs", 2)
    monkeypatch.setattr(engine.engine.config, "max_queue", 1)
    for path, body in ((CHAT, chat(n=4)), (COMPLETIONS, completion(n=4))):
        response = await client.post(path, json=body)
        assert_error(response, Case("n-never-fits", status=400, param="n"))
        assert "retry-after" not in response.headers
    assert (await client.post(CHAT, json=chat(n=3))).status_code == 200


async def test_an_unexpected_error_is_one_500_logged_once_with_the_request_id(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_template(*args: Any, **kwargs: Any) -> list[int]:
        raise RuntimeError("template exploded")

    monkeypatch.setattr("winnow.server.chat.chat_prompt", broken_template)
    with caplog.at_level(logging.ERROR):
        response = await client.post(CHAT, json=chat(), headers={"x-request-id": "req-boom"})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert response.headers["x-request-id"] == "req-boom"
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "req-boom" in logged[0].getMessage()
    assert logged[0].exc_info is not None
    assert str(logged[0].exc_info[1]) == "template exploded"
    monkeypatch.undo()
    assert (await client.post(CHAT, json=chat())).status_code == 200


async def test_more_messages_than_the_cap_is_a_400(client: httpx.AsyncClient) -> None:
    """Under the default body limit (the matrix's smaller one would answer 413 first)."""
    messages = [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)
    response = await client.post(CHAT, json=chat(messages=messages))
    assert_error(response, Case("messages-over-cap", param="messages"))
