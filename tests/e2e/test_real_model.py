"""`winnow serve` with no model: the real SmolLM2-135M-Instruct, against Hugging Face `generate`.

One server process for the module, started exactly as a user would (no model argument), with
WINNOW_CACHE_DIR pointing at the user's cache where the `smollm2_dir` fixture converted the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.e2e.conftest import ServerProcess
from winnow.models import Tokenizer
from winnow.models.default_model import DEFAULT_MODEL
from winnow.text import build_token_bytes

MAX_TOKENS = 24
SAMPLED_MAX_TOKENS = 8  # enough for seeded draws to differ
CHATS: dict[str, list[dict[str, str]]] = {
    "capital": [{"role": "user", "content": "What is the capital of France?"}],
    "system_prompt": [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "Name the three primary colors."},
    ],
    "multi_turn": [
        {"role": "user", "content": "My name is Ana and I like tennis."},
        {"role": "assistant", "content": "Nice to meet you, Ana! Tennis is a great sport."},
        {"role": "user", "content": "What sport do I like?"},
    ],
}
POEM = [{"role": "user", "content": "Write a one-line poem about the sea."}]


@pytest.fixture(scope="module")
def server(smollm2_server: ServerProcess) -> ServerProcess:
    return smollm2_server


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def hf_model(smollm2_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def token_bytes(hf_tokenizer: Any) -> list[bytes]:
    return build_token_bytes(Tokenizer(hf_tokenizer))


def chat(
    server: ServerProcess,
    messages: list[dict[str, str]],
    max_tokens: int = MAX_TOKENS,
    **params: Any,
) -> Any:
    return server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=max_tokens, **params
    )


def hf_greedy(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The new token ids of Hugging Face's greedy `generate` (stopping at the model's EOS)."""
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, prompt["input_ids"].shape[1] :].tolist()


def choice_bytes(choice: Any) -> list[bytes]:
    return [bytes(entry.bytes) for entry in choice.logprobs.content]


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_chat_equals_hugging_face_generate(
    server: ServerProcess, hf_model: Any, hf_tokenizer: Any, token_bytes: list[bytes], name: str
) -> None:
    expected = hf_greedy(hf_model, hf_tokenizer, CHATS[name])
    eos = hf_model.generation_config.eos_token_id
    ended = expected[-1] == eos
    expected_text_ids = expected[:-1] if ended else expected
    response = chat(server, CHATS[name], temperature=0, logprobs=True)
    choice = response.choices[0]
    # token for token: each generated token's exact bytes, in order, the EOS token included
    assert choice_bytes(choice) == [token_bytes[i] for i in expected]
    assert choice.message.content == hf_tokenizer.decode(expected_text_ids)
    assert choice.finish_reason == ("stop" if ended else "length")
    assert response.usage.completion_tokens == len(expected)


def test_known_answer(server: ServerProcess) -> None:
    response = chat(server, CHATS["capital"], temperature=0)
    assert "Paris" in response.choices[0].message.content


def test_streaming_equals_non_streaming(server: ServerProcess) -> None:
    params: dict[str, Any] = {"temperature": 0.8, "seed": 5, "max_tokens": SAMPLED_MAX_TOKENS}
    whole = chat(server, POEM, **params).choices[0]
    chunks = list(chat(server, POEM, stream=True, **params))
    deltas = [c.choices[0] for c in chunks if c.choices]
    streamed = "".join(d.delta.content or "" for d in deltas)
    finish = [d.finish_reason for d in deltas if d.finish_reason]
    assert streamed == whole.message.content
    assert finish == [whole.finish_reason]


def test_same_seed_same_choices_different_seed_different(server: ServerProcess) -> None:
    def texts(seed: int) -> list[str]:
        response = chat(server, POEM, SAMPLED_MAX_TOKENS, n=3, temperature=1.0, seed=seed)
        assert [c.index for c in response.choices] == [0, 1, 2]
        return [c.message.content for c in response.choices]

    first = texts(123)
    assert texts(123) == first
    assert len(set(first)) > 1  # n choices are independent draws
    assert texts(456) != first


def test_list_of_seeds_seeds_each_choice(server: ServerProcess) -> None:
    response = chat(server, POEM, SAMPLED_MAX_TOKENS, n=2, temperature=1.0, seed=[11, 22])
    assert response.seed == [11, 22]  # Winnow's extension field
    for seed, choice in zip([11, 22], response.choices, strict=True):
        alone = chat(server, POEM, SAMPLED_MAX_TOKENS, temperature=1.0, seed=seed)
        assert choice.message.content == alone.choices[0].message.content


def test_greedy_logprobs_are_the_top_of_top_logprobs(server: ServerProcess) -> None:
    response = chat(server, CHATS["system_prompt"], temperature=0, logprobs=True, top_logprobs=5)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert content
    for entry in content:
        tops = entry.top_logprobs
        assert len(tops) == 5
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        # greedy picks the most likely token: the sampled entry is the first of the top list
        assert (entry.token, entry.logprob) == (tops[0].token, tops[0].logprob)
        assert entry.logprob <= 0.0
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert choice.finish_reason == "stop"
    # the entries cover every generated token, the EOS token last; the text is the rest
    assert content[-1].token == "<|im_end|>"
    assert b"".join(choice_bytes(choice)[:-1]).decode() == choice.message.content
