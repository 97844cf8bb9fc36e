"""Per-vocabulary byte table for logprobs (`bytes` and `token` fields, docs/sampling.md).

Built once at start-up from the vocabulary pieces, never by re-encoding decoded text: a token's
bytes may be part of a UTF-8 character, which no string round trip can represent.

How the tokenizer kind is detected (`detect_tokenizer_kind`):

1. From the fast tokenizer's decoder configuration (`TextTokenizer.decoder_config`, nested
   `Sequence`s included): a `ByteLevel` decoder means byte-level BPE; `ByteFallback`,
   `Metaspace` or a `Replace` of `▁` means SentencePiece. This is what `decode` itself uses.
2. Otherwise from the vocabulary: whichever of the SentencePiece word marker `▁` and the
   byte-level space `Ġ` starts more pieces.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any

from winnow.text.tokenizer import TextTokenizer

SP_SPACE = "\u2581"  # ▁
SP_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece
_BYTE_LEVEL_SPACE = "\u0120"  # Ġ, the byte-level stand-in for b" "


class TokenizerKind(enum.Enum):
    SENTENCEPIECE = "sentencepiece"
    BYTE_LEVEL = "byte_level"


def token_text(b: bytes) -> str:
    """The logprobs `token` field: a partial UTF-8 sequence shows as U+FFFD."""
    return b.decode("utf-8", errors="replace")


def build_token_bytes(tokenizer: TextTokenizer) -> list[bytes]:
    """For every id in [0, vocab_size), the exact bytes that token contributes.

    Added and special tokens map to the UTF-8 of their content; ids with no piece (holes in
    the vocabulary) map to b"".
    """
    kind = detect_tokenizer_kind(tokenizer)
    if kind is TokenizerKind.SENTENCEPIECE:
        piece_bytes = _sentencepiece_piece_bytes
    else:
        piece_bytes = byte_level_piece_bytes
    added = tokenizer.added_tokens()
    table: list[bytes] = []
    for token_id in range(tokenizer.vocab_size):
        if token_id in added:
            table.append(added[token_id].encode("utf-8"))
            continue
        piece = tokenizer.piece(token_id)
        table.append(b"" if piece is None else piece_bytes(piece))
    return table


def detect_tokenizer_kind(tokenizer: TextTokenizer) -> TokenizerKind:
    """SentencePiece or byte-level BPE; see the module docstring for how."""
    decoder = tokenizer.decoder_config()
    if decoder is not None:
        kind = _kind_from_decoder(decoder)
        if kind is not None:
            return kind
    return _kind_from_vocab(tokenizer.vocab())


def _kind_from_decoder(config: dict[str, Any]) -> TokenizerKind | None:
    decoder_type = config.get("type")
    if decoder_type == "Sequence":
        for child in config.get("decoders", []):
            kind = _kind_from_decoder(child)
            if kind is not None:
                return kind
        return None
    if decoder_type == "ByteLevel":
        return TokenizerKind.BYTE_LEVEL
    if decoder_type in ("ByteFallback", "Metaspace"):
        return TokenizerKind.SENTENCEPIECE
    if decoder_type == "Replace" and config.get("pattern", {}).get("String") == SP_SPACE:
        return TokenizerKind.SENTENCEPIECE
    return None


def _kind_from_vocab(vocab: Mapping[str, int]) -> TokenizerKind:
    sp = sum(piece.startswith(SP_SPACE) for piece in vocab)
    byte_level = sum(piece.startswith(_BYTE_LEVEL_SPACE) for piece in vocab)
    if sp == byte_level == 0:
        raise ValueError("cannot tell the tokenizer kind: neither ▁ nor Ġ pieces in the vocab")
    return TokenizerKind.SENTENCEPIECE if sp > byte_level else TokenizerKind.BYTE_LEVEL


def _sentencepiece_piece_bytes(piece: str) -> bytes:
    byte_piece = SP_BYTE_PIECE.fullmatch(piece)
    if byte_piece is not None:
        return bytes([int(byte_piece.group(1), 16)])
    return piece.replace(SP_SPACE, " ").encode("utf-8")


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes-to-unicode table.

    Printable bytes (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves; every other byte, in
    increasing order, is shown as the next code point from U+0100 on (so b" " is `Ġ`).
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = sorted(set(range(256)) - set(printable))
    for offset, b in enumerate(others):
        table[chr(0x100 + offset)] = b
    return table


_UNICODE_TO_BYTE = _unicode_to_byte()


def byte_level_piece_bytes(piece: str) -> bytes:
    """The bytes a byte-level BPE piece stands for, as the `ByteLevel` decoder reads it."""
    # A piece with a character outside the table is plain text, as the ByteLevel decoder treats it.
    if all(c in _UNICODE_TO_BYTE for c in piece):
        return bytes(_UNICODE_TO_BYTE[c] for c in piece)
    return piece.encode("utf-8")
