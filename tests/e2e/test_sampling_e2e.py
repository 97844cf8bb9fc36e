"""Every sampling parameter, through a real server and the strict OpenAI SDK."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.e2e.conftest import ServerProcess
from winnow.models import Tokenizer
from winnow.text import build_token_bytes

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def chat(server: ServerProcess, **params: Any) -> Any:
    extra = {k: params.pop(k) for k in list(params) if k in EXTENSIONS}
    return server.client().chat.completions.create(
        model="demo", messages=params.pop("messages", MESSAGES), extra_body=extra, **params
    )


EXTENSIONS = {
    "top_k",
    "min_p",
    "xtc_probability",
    "xtc_threshold",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "eos_token",
    "ignore_eos",
    "logprobs_mode",
    "time_limit",
}


@pytest.fixture(scope="module")
def greedy(server: ServerProcess) -> Any:
    return chat(
        server, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True
    )


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    return build_token_bytes(tokenizer)


def first_token_id(token_bytes: list[bytes], response: Any) -> int:
    """The id of the choice's first token, found from its logprobs entry's bytes."""
    return token_bytes.index(bytes(response.choices[0].logprobs.content[0].bytes))


def test_logit_bias_plus_100_forces_a_token(server: ServerProcess, tokenizer: Tokenizer) -> None:
    forced = tokenizer.encode("ocean", add_special_tokens=False)[-1]
    response = chat(server, max_tokens=5, temperature=1.0, seed=3, logit_bias={str(forced): 100})
    piece = tokenizer.decode([forced])
    assert response.choices[0].message.content.replace(" ", "") == piece.strip() * 5


def test_logit_bias_minus_100_bans_the_argmax(
    server: ServerProcess, greedy: Any, token_bytes: list[bytes]
) -> None:
    banned = first_token_id(token_bytes, greedy)
    response = chat(
        server, max_tokens=1, temperature=0, logprobs=True, logit_bias={str(banned): -100}
    )
    assert first_token_id(token_bytes, response) != banned


def test_top_k_1_top_p_0_min_p_1_equal_greedy(server: ServerProcess, greedy: Any) -> None:
    expected = greedy.choices[0].message.content
    for params in ({"top_k": 1}, {"top_p": 0.0}, {"min_p": 1.0}):
        response = chat(server, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True, **params)
        assert response.choices[0].message.content == expected, params


def test_seed_reproducible_and_echoed(server: ServerProcess) -> None:
    one = chat(server, max_tokens=10, temperature=1.0, seed=42)
    two = chat(server, max_tokens=10, temperature=1.0, seed=42)
    other = chat(server, max_tokens=10, temperature=1.0, seed=43)
    assert one.choices[0].message.content == two.choices[0].message.content
    assert one.choices[0].message.content != other.choices[0].message.content
    assert one.model_extra["seed"] == 42


def test_n_choices_and_seed_list(server: ServerProcess) -> None:
    three = chat(server, max_tokens=8, temperature=1.0, seed=5, n=3, ignore_eos=True)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.message.content for c in three.choices}) == 3
    assert three.usage.completion_tokens == 24
    listed = chat(server, max_tokens=8, temperature=1.0, n=2, ignore_eos=True, seed=[7, 8])
    alone = chat(server, max_tokens=8, temperature=1.0, ignore_eos=True, seed=8)
    assert listed.choices[1].message.content == alone.choices[0].message.content


def test_raw_logprobs_equal_the_models_log_softmax(
    server: ServerProcess, greedy: Any, tokenizer: Tokenizer, demo_model_dir: Path
) -> None:
    prompt = tokenizer.render_chat(MESSAGES)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    first = greedy.choices[0].logprobs.content[0]
    assert first.logprob == pytest.approx(expected.max().item(), abs=1e-4)
    top_values = expected.topk(3).values.tolist()
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top_values, abs=1e-4)
    assert first.top_logprobs[0].token == first.token


def test_processed_logprobs_report_removed_tokens_as_floor(server: ServerProcess) -> None:
    response = chat(
        server,
        max_tokens=3,
        temperature=1.0,
        seed=1,
        top_k=2,
        logprobs=True,
        top_logprobs=5,
        logprobs_mode="processed",
    )
    for entry in response.choices[0].logprobs.content:
        probs = [math.exp(t.logprob) for t in entry.top_logprobs]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)  # all mass on the 2 survivors
        assert [t.logprob for t in entry.top_logprobs[2:]] == [-9999.0] * 3


def test_stop_string_never_appears(server: ServerProcess, greedy: Any) -> None:
    text = greedy.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    final = chat(server, max_tokens=12, temperature=0, stop=[stop], ignore_eos=True)
    assert final.choices[0].message.content == text[: text.index(stop)]
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].model_extra["stop_reason"] == stop
    stream = server.client().chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body={"ignore_eos": True},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text[: text.index(stop)]
    assert all(stop not in piece for piece in pieces)


def test_stop_token_ids_and_min_tokens(
    server: ServerProcess, greedy: Any, token_bytes: list[bytes]
) -> None:
    first = first_token_id(token_bytes, greedy)
    stopped = chat(server, max_tokens=12, temperature=0, stop_token_ids=[first])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == first
    assert stopped.usage.completion_tokens == 1
    aliased = chat(server, max_tokens=12, temperature=0, eos_token=[first])
    assert aliased.choices[0].model_extra["stop_reason"] == first
    held = chat(server, max_tokens=12, temperature=0, stop_token_ids=[first], min_tokens=4)
    assert held.usage.completion_tokens >= 4


def test_penalties_reach_the_processed_distribution(server: ServerProcess) -> None:
    """Greedy rows report processed logprobs after penalties (at T=1). Frequency and presence
    penalties only see generated tokens, so the first position is untouched and later ones
    shift; the repetition penalty also covers the prompt. The exact formulas are pinned
    against the reference sampler in tests/sampling."""

    def processed(**penalty: float) -> list[tuple[str, float]]:
        response = chat(
            server,
            max_tokens=8,
            temperature=0,
            ignore_eos=True,
            logprobs=True,
            logprobs_mode="processed",
            **penalty,
        )
        return [(e.token, e.logprob) for e in response.choices[0].logprobs.content]

    plain = processed()
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        shifted = processed(**penalty)
        assert shifted[0] == plain[0], penalty
        assert shifted[1:] != plain[1:], penalty
    assert processed(repetition_penalty=1.8) != plain


def test_xtc_removes_the_most_likely_tokens(server: ServerProcess, greedy: Any) -> None:
    """With XTC always on, the top token (prob >= threshold alongside another) is never kept,
    so sampling at top_k=2 must pick the second most likely token each time."""
    response = chat(
        server,
        max_tokens=1,
        temperature=1.0,
        seed=4,
        top_k=2,
        xtc_probability=1.0,
        xtc_threshold=0.0,
        logprobs=True,
        top_logprobs=2,
    )
    entry = response.choices[0].logprobs.content[0]
    assert entry.token == entry.top_logprobs[1].token


def test_time_limit_ends_with_length(server: ServerProcess) -> None:
    response = chat(server, max_tokens=1800, temperature=1.0, ignore_eos=True, time_limit=100)
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].model_extra["stop_reason"] == "time_limit"
    assert response.usage.completion_tokens < 1800


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("xtc_probability", 2),
        ("repetition_penalty", 0),
        ("frequency_penalty", 3),
        ("logit_bias", {"999999": 1}),
        ("top_logprobs", 21),
        ("n", 1000),
    ],
)
def test_invalid_values_are_400_with_param(server: ServerProcess, field: str, value: Any) -> None:
    body = {"model": "demo", "messages": MESSAGES, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field
    with pytest.raises(openai.BadRequestError):
        chat(server, max_tokens=2, **{field: value})
