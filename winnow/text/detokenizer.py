"""Token ids -> text, one token at a time, never showing half a character.

`incremental_detokenizer` picks the Rust tokenizer's own `DecodeStream` where the tokenizer has
one (every `tokenizers`-backed Hugging Face tokenizer) and the Python piece window otherwise (a
Python-only tokenizer, e.g. one brought by `--trust-remote-code`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream

from winnow.text.tokenizer import TextTokenizer

REPLACEMENT_CHAR = "\ufffd"

# Prompt pieces kept as left context: enough for the decoder to treat the first generated piece
# as a continuation (SentencePiece strips the leading space of the first piece it decodes) and
# to cover one UTF-8 character split over byte pieces (at most 4 bytes).
_PROMPT_CONTEXT_PIECES = 4

# A character is at most 4 bytes, so a window this long that still ends in U+FFFD holds invalid
# bytes that no later piece can repair; it is released as is rather than re-decoded forever.
_MAX_HELD_PIECES = 16


class Detokenizer(Protocol):
    """Text of one generated choice, a token at a time."""

    def append(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        ...

    def flush(self) -> str:
        """Release the held text (an incomplete character shows as U+FFFD, as `decode` does)."""
        ...


def incremental_detokenizer(
    tokenizer: TextTokenizer, prompt_token_ids: Sequence[int]
) -> Detokenizer:
    """The fastest detokeniser this tokenizer allows, its text continuing the prompt's."""
    backend = tokenizer.backend()
    if backend is None:
        return PieceWindowDetokenizer(tokenizer, prompt_token_ids)
    return StreamDetokenizer(backend, tokenizer, prompt_token_ids)


class StreamDetokenizer:
    """The Rust tokenizer's `DecodeStream`: one call per token, its prefix/read offsets kept on
    the Rust side, decoding a window of recent ids as `PieceWindowDetokenizer` does.

    Around it: special tokens and ids past the vocabulary never reach it. A (re)started stream is
    first fed its left context, the prompt's last ids, so the first generated piece decodes as a
    continuation (SentencePiece keeps its leading `▁` space); when that context ends inside a
    character, the stream holds it and repeats its text at its first output, which is cut off
    there. And `DecodeStream` would hold a window ending in U+FFFD forever: after
    `_MAX_HELD_PIECES` held ids, their text is released as `decode` shows it and the stream
    restarts with them as its context (as the piece window does), so that invalid bytes later
    joined by more bytes still show as `decode` groups them.
    """

    def __init__(
        self, backend: RustTokenizer, tokenizer: TextTokenizer, prompt_token_ids: Sequence[int]
    ) -> None:
        self._backend = backend
        self._special_ids = tokenizer.special_ids
        self._vocab_size = tokenizer.vocab_size
        # Recent ids: the left context (`[:read]`, its text emitted or the prompt's), then the
        # held ones; trimmed on each output.
        self._ids = [i for i in prompt_token_ids if self._is_text(i)][-_PROMPT_CONTEXT_PIECES:]
        self._read = len(self._ids)
        self._stream, self._repeated = self._restart()

    def _is_text(self, token_id: int) -> bool:
        """False for special tokens and ids past the vocabulary (padding rows of the embedding):
        both contribute no text, as in `decode(skip_special_tokens=True)`."""
        return token_id < self._vocab_size and token_id not in self._special_ids

    def _restart(self) -> tuple[DecodeStream, str]:
        """A stream fed the context ids, and the text of them it will repeat at its first
        output ("" unless it held them all: a context ending inside a character)."""
        stream = DecodeStream(skip_special_tokens=True)
        if not self._ids or stream.step(self._backend, self._ids) is not None:
            return stream, ""
        return stream, self._backend.decode(self._ids, skip_special_tokens=True)

    def append(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        if not self._is_text(token_id):
            return ""
        ids = self._ids
        ids.append(token_id)
        text = self._stream.step(self._backend, token_id)
        if text is not None:
            if self._repeated:
                text = text[_common_prefix_len(self._repeated, text) :]
                self._repeated = ""
            if len(ids) > 2 * _PROMPT_CONTEXT_PIECES:
                del ids[:-_PROMPT_CONTEXT_PIECES]
            self._read = len(ids)
            return text
        if len(ids) - self._read < _MAX_HELD_PIECES:
            return ""
        text = self.flush()
        del ids[: self._read]
        self._read = len(ids)
        self._stream, self._repeated = self._restart()
        return text

    def flush(self) -> str:
        """Release the held text (an incomplete character shows as U+FFFD, as `decode` does)."""
        if self._read == len(self._ids):
            return ""
        head = self._backend.decode(self._ids[: self._read], skip_special_tokens=True)
        text = self._backend.decode(self._ids, skip_special_tokens=True)
        return text[_common_prefix_len(head, text) :]


class PieceWindowDetokenizer:
    """Prefix-offset / read-offset incremental detokeniser over the tokenizer's pieces.

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
            if len(pieces) == _PROMPT_CONTEXT_PIECES:
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
        if text.endswith(REPLACEMENT_CHAR) and len(self._pieces) - self._read < _MAX_HELD_PIECES:
            return ""
        delta = text[_common_prefix_len(self._read_text, text) :]
        del self._pieces[: self._read]
        self._read = len(self._pieces)
        self._read_text = self._decode(self._pieces)
        return delta

    def flush(self) -> str:
        """Release the held text (an incomplete character shows as U+FFFD, as `decode` does)."""
        if self._read == len(self._pieces):
            return ""
        text = self._decode(self._pieces)
        return text[_common_prefix_len(self._read_text, text) :]


def _common_prefix_len(a: str, b: str) -> int:
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
