"""Token ids -> text, one token at a time, never showing half a character: the piece window,
which re-decodes a few pieces through the tokenizer each step (any tokenizer), and what every
detokeniser shares (`winnow.text.table_detokenizer` is the fast one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from winnow.text.decoder_table import REPLACEMENT_CHAR
from winnow.text.tokenizer import TextTokenizer

# Prompt pieces kept as left context: enough for the decoder to treat the first generated piece
# as a continuation (SentencePiece strips the leading space of the first piece it decodes) and
# to cover one UTF-8 character split over byte pieces (at most 4 bytes).
PROMPT_CONTEXT_PIECES = 4

# A character is at most 4 bytes, so a window this long that still ends in U+FFFD holds invalid
# bytes that no later piece can repair; it is released as is rather than re-decoded forever.
MAX_HELD_PIECES = 16


class Detokenizer(Protocol):
    """One choice's text, fed one token at a time."""

    def append(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        ...

    def flush(self) -> str:
        """Release the held text (an incomplete character shows as U+FFFD, as `decode` does)."""
        ...


class IncrementalDetokenizer:
    """Prefix-offset / read-offset incremental detokeniser.

    The window `pieces` holds already emitted pieces (`pieces[:read]`, the left context) followed
    by pieces not emitted yet. Each step decodes the window and emits what lies past the text of
    the context; once the window's text is final, the context becomes the pieces just emitted.
    Decoding the context alongside keeps spacing rules that depend on a neighbour (SentencePiece
    `▁`, byte-fallback groups, byte-level BPE) identical to decoding the whole sequence.
    """

    def __init__(self, tokenizer: TextTokenizer, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._special_ids = tokenizer.special_ids
        self._pieces: list[str] = self._prompt_context(prompt_token_ids)
        self._read = len(self._pieces)
        self._read_text = self._decode(self._pieces)

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[str]:
        pieces: list[str] = []
        for token_id in reversed(prompt_token_ids):
            if len(pieces) == PROMPT_CONTEXT_PIECES:
                break
            piece = self._piece(token_id)
            if piece is not None:
                pieces.append(piece)
        pieces.reverse()
        return pieces

    def _piece(self, token_id: int) -> str | None:
        """The token's piece, or None for special tokens and ids past the vocabulary (padding
        rows of the embedding): both contribute no text, as in `decode(skip_special_tokens=True)`.
        """
        if token_id in self._special_ids:
            return None
        return self._tokenizer.piece(token_id)

    def _decode(self, pieces: list[str]) -> str:
        return self._tokenizer.join_pieces(pieces) if pieces else ""

    def append(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        piece = self._piece(token_id)
        if piece is None:
            return ""
        self._pieces.append(piece)
        text = self._decode(self._pieces)
        if text.endswith(REPLACEMENT_CHAR) and len(self._pieces) - self._read < MAX_HELD_PIECES:
            return ""
        delta = text[common_prefix_len(self._read_text, text) :]
        del self._pieces[: self._read]
        self._read = len(self._pieces)
        self._read_text = self._decode(self._pieces)
        return delta

    def flush(self) -> str:
        """Release the held text (an incomplete character shows as U+FFFD, as `decode` does)."""
        if self._read == len(self._pieces):
            return ""
        text = self._decode(self._pieces)
        return text[common_prefix_len(self._read_text, text) :]


def common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix; `len(a)` in the usual case where `b` extends `a`.

    They differ only around invalid UTF-8: a prompt ending inside a character that the output
    completes (the context shows U+FFFD, the window the whole character, which is emitted), or
    bytes already released as U+FFFD that a later byte-fallback piece regroups.
    """
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
