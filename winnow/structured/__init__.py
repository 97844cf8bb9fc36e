"""structured: grammars for constrained decoding, per-sequence matchers, tool-call formats and
parsers. Knows nothing about HTTP; the sampler only ever sees a token bitmask."""

from winnow.structured.spec import GrammarSpec

__all__ = ["GrammarSpec"]
