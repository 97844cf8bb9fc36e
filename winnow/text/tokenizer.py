"""The tokenizer as text handling sees it: pieces of token ids, and how pieces join into text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class TextTokenizer(Protocol):
    """What the `text` package needs of a tokenizer (`winnow.models.Tokenizer` is one).

    A piece is the vocabulary's spelling of a token (SentencePiece `▁Hello`, `<0xF0>`; byte-level
    `Ġhello`); `join_pieces` is the tokenizer's own decoder over pieces, so that neighbours
    decoded together keep the spacing and byte grouping that decoding a whole sequence gives.
    """

    @property
    def vocab_size(self) -> int:
        """Ids are 0 .. vocab_size - 1 (the model's logits may be wider: padding rows)."""
        ...

    @property
    def special_ids(self) -> frozenset[int]:
        """Control tokens (BOS, EOS, [INST], ...): they add no text."""
        ...

    def piece(self, token_id: int) -> str | None:
        """The token's piece; None for an id with none (past the vocabulary)."""
        ...

    def join_pieces(self, pieces: Sequence[str]) -> str:
        """The text of consecutive pieces."""
        ...

    def added_tokens(self) -> Mapping[int, str]:
        """Tokens added to the vocabulary (special ones included), by id, as their text."""
        ...

    def vocab(self) -> Mapping[str, int]:
        """Every piece's id."""
        ...

    def decoder_config(self) -> dict[str, Any] | None:
        """The fast tokenizer's decoder as JSON (what tells SentencePiece from byte-level BPE),
        or None without one."""
        ...
