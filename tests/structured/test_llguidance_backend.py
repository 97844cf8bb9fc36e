"""Compiling specs with llguidance against the demo model's real tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from winnow.models import LoadedModel
from winnow.structured.backend import GrammarError
from winnow.structured.llguidance_backend import LLGuidanceBackend
from winnow.structured.schema_limits import MAX_SCHEMA_NESTING, check_schema_shape
from winnow.structured.spec import GrammarSpec


@pytest.fixture(scope="module")
def backend(loaded: LoadedModel) -> LLGuidanceBackend:
    tokenizer = loaded.tokenizer
    return LLGuidanceBackend(tokenizer.hf, loaded.config.vocab_size, tokenizer.eos_token_ids)


def allowed_tokens(backend: LLGuidanceBackend, matcher: object) -> set[int]:
    out = np.zeros((1, backend.words), dtype=np.int32)
    backend.fill_bitmasks([matcher], out)
    bits = np.unpackbits(out.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def schema(value: object) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(value))


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (schema({"type": "string", "format": "made-up"}), "made-up"),
        (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
        (GrammarSpec("json_schema", "[" * 100_000 + "]" * 100_000), "not valid JSON"),
        (schema(7), "object or a boolean"),
        (GrammarSpec("lark", "start: undefined_rule"), "undefined_rule"),
    ],
)
def test_unenforceable_specs_are_refused_by_name(
    backend: LLGuidanceBackend, spec: GrammarSpec, named: str
) -> None:
    with pytest.raises(GrammarError, match=named):
        backend.compile(spec)


def test_depth_is_bounded_without_recursion() -> None:
    deep: object = {"type": "integer"}
    for _ in range(10_000):
        deep = {"items": deep}
    with pytest.raises(GrammarError, match=f"deeper than {MAX_SCHEMA_NESTING}"):
        check_schema_shape(deep)
    check_schema_shape({"type": "object", "properties": {"a": {"type": "array"}}})


def test_json_has_no_whitespace_between_tokens(backend: LLGuidanceBackend, loaded) -> None:
    """A random model can never stall on spaces: after `{` only a key or `}` may follow."""
    matcher = backend.compile(GrammarSpec("json_object")).new_matcher()
    hf = loaded.tokenizer.hf
    brace = hf.convert_tokens_to_ids("{")
    assert matcher.consume(brace)
    texts = {
        hf.convert_tokens_to_string([hf.convert_ids_to_tokens(t)])
        for t in allowed_tokens(backend, matcher)
    }
    assert texts and all(text.lstrip() == text and text[0] in '"}' for text in texts)


def byte_tokens(loaded: LoadedModel, text: str) -> list[int]:
    """`text` spelled with the tokenizer's byte-fallback pieces, one token per byte."""
    hf = loaded.tokenizer.hf
    return [hf.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in text.encode()]


def test_lark_with_embedded_json_compiles_and_ends(
    backend: LLGuidanceBackend, loaded: LoadedModel
) -> None:
    """The kind of grammar forced tool calls use: fixed text around a JSON schema."""
    schema_text = json.dumps({"type": "object", "properties": {"x": {"enum": [1, 2]}}})
    grammar = f'start: "<call>" %json{schema_text} "</call>"'
    matcher = backend.compile(GrammarSpec("lark", grammar)).new_matcher()
    assert all(matcher.consume(t) for t in byte_tokens(loaded, '<call>{"x":2}</call>'))
    # nothing can follow, so the engine ends the sequence now; only EOS is allowed anyway
    assert matcher.is_finished
    assert allowed_tokens(backend, matcher) == set(loaded.tokenizer.eos_token_ids)


def test_a_resumed_matcher_continues_where_the_output_left_off(backend: LLGuidanceBackend) -> None:
    grammar = backend.compile(schema({"enum": ["alpha", "beta"]}))
    fresh = grammar.new_matcher()
    first = min(allowed_tokens(backend, fresh))
    assert fresh.consume(first)
    resumed = grammar.new_matcher([first])
    assert allowed_tokens(backend, resumed) == allowed_tokens(backend, fresh)
    with pytest.raises(GrammarError):
        grammar.new_matcher([first, first, first, first])
