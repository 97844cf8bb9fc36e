"""Detokenisers for the text tests: the one the engine picks for a tokenizer (the table for
every tokenizer these tests use), or the piece window."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from winnow.text import Detokenizers
from winnow.text.detokenizer import Detokenizer, IncrementalDetokenizer


@cache
def detokenizers(tokenizer: Any) -> Detokenizers:
    """Built once per tokenizer, as the engine does."""
    return Detokenizers(tokenizer)


def new_detokenizer(tokenizer: Any, prompt: Sequence[int], window: bool = False) -> Detokenizer:
    if window:
        return IncrementalDetokenizer(tokenizer, prompt)
    return detokenizers(tokenizer).new(prompt)
