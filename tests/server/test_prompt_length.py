"""Prompts that cannot fit the context are refused before a tokenizer thread spends seconds on
them: the bound (max_model_len times the vocabulary's longest token) never refuses one that fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from winnow.models import Tokenizer
from winnow.server.errors import ApiError
from winnow.server.prompts import check_prompt_length, text_prompt

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


def test_no_token_covers_more_characters_than_the_bound(tokenizer: Tokenizer) -> None:
    longest = max(
        len(tokenizer.hf.decode([token_id], skip_special_tokens=False))
        for token_id in range(tokenizer.vocab_size)
    )
    assert longest <= tokenizer.longest_token_chars


def test_text_past_the_bound_is_refused_unencoded_and_text_at_it_is_encoded(
    tokenizer: Tokenizer,
) -> None:
    cap = MAX_MODEL_LEN * tokenizer.longest_token_chars
    check_prompt_length(tokenizer, cap, MAX_MODEL_LEN, "prompt")
    with pytest.raises(ApiError) as refused:
        text_prompt(tokenizer, "x" * (cap + 1), max_model_len=MAX_MODEL_LEN)
    assert refused.value.param == "prompt" and refused.value.code == "context_length_exceeded"
    # the refused text really is over the context
    assert len(tokenizer.encode("x" * (cap + 1))) > MAX_MODEL_LEN
