"""The llguidance grammar backend: lazy matchers, explicit refusal of unenforceable keywords.

Compiling builds a prototype matcher and computes its first mask (llguidance builds its lexer
lazily, on the first mask), so that all of a grammar's start-up cost is paid by whoever calls
`compile` -- the server, off the engine thread -- and none by the engine's next step. Each
sequence then starts from a copy of the prototype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from winnow.structured.backend import GrammarError
from winnow.structured.schema_limits import check_schema_shape
from winnow.structured.spec import GrammarSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# No whitespace between JSON tokens: a model (a random-weight one above all) that likes spaces
# could otherwise emit them until max_tokens inside an otherwise valid document.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
# Resource bounds on one grammar: llguidance stops a build or a mask step that exceeds them
# (fuel is its measure of work), which also bounds compile time.
_LIMITS = llguidance.LLParserLimits(
    initial_lexer_fuel=1_000_000,
    step_lexer_fuel=200_000,
    max_grammar_size=200_000,
    verbose_errors=False,
)


# Masks are filled on llguidance's thread pool only for large batches on hosts with cores to
# spare: a mask takes microseconds, and on a busy 2-core host handing 16 of them to the pool
# took far longer than filling them one after another on the calling thread
# (BENCHMARKS.md, "Structured output").
_PARALLEL_MIN_ROWS = 32
_PARALLEL_MIN_CORES = 8


class LLGuidanceMatcher:
    """A sequence's matcher (see GrammarMatcher)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.inner = matcher

    def consume(self, token_id: int) -> bool:
        return bool(self.inner.consume_token(token_id)) and not self.inner.is_error()

    @property
    def is_finished(self) -> bool:
        return bool(self.inner.is_stopped())


class LLGuidanceGrammar:
    """A compiled grammar: a prototype matcher that has never consumed a token."""

    def __init__(self, prototype: llguidance.LLMatcher) -> None:
        self._prototype = prototype

    def new_matcher(self, output_token_ids: Sequence[int] = ()) -> LLGuidanceMatcher:
        matcher = LLGuidanceMatcher(self._prototype.deep_copy())
        for token_id in output_token_ids:
            if not matcher.consume(token_id):
                raise GrammarError(f"token {token_id} does not match the grammar")
        return matcher


class LLGuidanceBackend:
    """Compiles GrammarSpecs for one tokenizer (see GrammarBackend)."""

    def __init__(
        self, hf_tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Sequence[int]
    ) -> None:
        """`hf_tokenizer`: llguidance builds its own token trie from a fast Hugging Face
        tokenizer's vocabulary and pre-tokenizer."""
        if not isinstance(hf_tokenizer, PreTrainedTokenizerFast):
            raise TypeError(f"llguidance needs a fast tokenizer, not {type(hf_tokenizer)}")
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        self._tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )
        cores = os.cpu_count() or 1
        self._executor = llguidance.LLExecutor() if cores >= _PARALLEL_MIN_CORES else None

    def compile(self, spec: GrammarSpec) -> LLGuidanceGrammar:
        grammar = self._grammar_text(spec)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=_LIMITS)
        if not matcher.is_error():
            first_mask = np.empty((1, self.words), dtype=np.int32)
            matcher.unsafe_compute_mask_ptr(first_mask.ctypes.data, first_mask.nbytes)
        if matcher.is_error():
            raise GrammarError(f"the {_NOUNS[spec.kind]} cannot be enforced: {matcher.get_error()}")
        return LLGuidanceGrammar(matcher)

    def fill_bitmasks(self, matchers: Sequence[Any], out: np.ndarray) -> None:
        assert out.dtype == np.int32 and out.flags["C_CONTIGUOUS"] and out.shape[1] == self.words
        if self._executor is None or len(matchers) < _PARALLEL_MIN_ROWS:
            for row, matcher in enumerate(matchers):
                matcher.inner.unsafe_compute_mask_ptr(out[row].ctypes.data, out[row].nbytes)
            return
        pairs = [(matcher.inner, row) for row, matcher in enumerate(matchers)]
        fill_next_token_bitmask_par(self._executor, pairs, out[: len(pairs)])

    @staticmethod
    def _grammar_text(spec: GrammarSpec) -> str:
        if spec.kind == "lark":
            return str(llguidance.LLMatcher.grammar_from_lark(spec.source))
        if spec.kind == "json_object":
            schema: Any = {"type": "object"}
        else:
            try:
                schema = json.loads(spec.source)
            except (ValueError, RecursionError) as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict | bool):
                raise GrammarError("the JSON schema must be an object or a boolean")
            check_schema_shape(schema)
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema cannot be compiled: {exc}") from None
        return str(text)


_NOUNS = {"json_object": "JSON object grammar", "json_schema": "JSON schema", "lark": "grammar"}
