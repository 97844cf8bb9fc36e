"""The grammar backend interface: compile a GrammarSpec once, give each sequence a matcher.

A backend (llguidance today; xgrammar could be a second one) implements `GrammarBackend`. The
engine only uses these three protocols; the sampler only sees the bitmasks they fill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from winnow.structured.spec import GrammarSpec


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled or enforced; the message says why (and names
    the offending keyword where there is one)."""


class GrammarMatcher(Protocol):
    """One sequence's position in the grammar."""

    def consume(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar did not allow it."""
        ...

    @property
    def is_finished(self) -> bool:
        """The grammar has ended: nothing but the end of the sequence may follow."""
        ...


class CompiledGrammar(Protocol):
    """A grammar ready to start matchers (safe to share between threads)."""

    def new_matcher(self, output_token_ids: Sequence[int] = ()) -> GrammarMatcher:
        """A matcher at the start of the output, advanced over `output_token_ids` (a sequence
        resumed after preemption)."""
        ...


class GrammarBackend(Protocol):
    """Compiles specs against one model's tokenizer and fills token bitmasks for a batch."""

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Raises GrammarError for a spec that cannot be enforced. May take milliseconds: call
        it off the engine thread and off the event loop."""
        ...

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher], out: np.ndarray) -> None:
        """Row i of `out` ([>= len(matchers), ceil(V/32)] int32, C-contiguous) := the tokens
        matcher i allows next, bit j of word w standing for token 32 * w + j."""
        ...
