"""A tokenizer's decoder as a table: what each token id adds, and how neighbours combine.

Built once per tokenizer, so that text is made without calling the tokenizer each step. Two
decoder shapes are reproduced, read from the fast tokenizer's decoder configuration:

- byte-level BPE (`ByteLevel`: GPT-2, Llama 3, Qwen, SmolLM2): a token is the bytes its piece
  spells in the GPT-2 byte alphabet; text is the concatenation decoded as UTF-8, U+FFFD for
  invalid bytes (maximal subparts, as Rust's `from_utf8_lossy` and Python's `errors="replace"`).
- SentencePiece with byte fallback (`Replace ▁ -> " "`, `ByteFallback`, `Fuse`, optionally
  `Strip` of one leading space: Llama 2, Mistral): a token is its piece with `▁` as a space, or
  one byte for a `<0xNN>` piece; a run of byte pieces is its UTF-8 text if the whole run is
  valid, else one U+FFFD per byte (so later bytes can change earlier ones' text); then one
  leading space of the whole text is dropped.

Special ids (and ids without a piece) add no text, as in the piece window. A table is only used
after it agreed with the tokenizer's own decoder (`TextTokenizer.join_pieces`) on the whole
vocabulary in id order and on random sequences of whole and split characters; otherwise
`build_decoder_table` returns None and text goes through the piece window.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from winnow.text.token_bytes import SP_BYTE_PIECE, SP_SPACE, byte_level_piece_bytes
from winnow.text.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"

# One token's part of the text: bytes (byte-level), str (a SentencePiece piece, ▁ as a space)
# or int (a byte-fallback byte); None for a token that adds no text.
Entry = bytes | str | int | None

_SAMPLES = 300  # random sequences the table is checked on at build
_SAMPLE_SEED = 0


@dataclass(frozen=True)
class DecoderTable:
    """`entries[id]` is what token `id` adds; `join` is the decoder over entries (no Nones).

    `byte_level`: entries are bytes. Otherwise entries are str or int, and `strip_space` says
    whether the decoder drops one leading space of the whole text.
    """

    byte_level: bool
    entries: list[Entry]
    strip_space: bool = False

    @property
    def join(self) -> Callable[[Sequence[Any]], str]:
        return _join_bytes if self.byte_level else self._join_pieces

    def _join_pieces(self, entries: Sequence[str | int]) -> str:
        parts: list[str] = []
        run = bytearray()
        for entry in entries:
            if type(entry) is int:
                run.append(entry)
                continue
            if run:
                parts.append(_byte_run_text(run))
                run = bytearray()
            assert isinstance(entry, str)
            parts.append(entry)
        if run:
            parts.append(_byte_run_text(run))
        text = "".join(parts)
        return text[1:] if self.strip_space and text.startswith(" ") else text


def _join_bytes(entries: Sequence[bytes]) -> str:
    return b"".join(entries).decode("utf-8", errors="replace")


def _byte_run_text(run: bytearray) -> str:
    """`ByteFallback`: a run of byte pieces is its text only if all of it is valid UTF-8."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return REPLACEMENT_CHAR * len(run)


def build_decoder_table(tokenizer: TextTokenizer) -> DecoderTable | None:
    """The tokenizer's table, or None (logged) when its decoder is not one of the shapes above
    or the table disagrees with the decoder on the check samples."""
    config = tokenizer.decoder_config()
    shape = _shape(config) if config is not None else None
    if shape is None:
        logger.info("detokenisation: decoder %s not reproduced by a table; piece window", config)
        return None
    byte_level, strip_space = shape
    special = tokenizer.special_ids
    pieces = [
        None if token_id in special else tokenizer.piece(token_id)
        for token_id in range(tokenizer.vocab_size)
    ]
    to_entry = byte_level_piece_bytes if byte_level else _sentencepiece_entry
    entries: list[Entry] = [None if piece is None else to_entry(piece) for piece in pieces]
    table = DecoderTable(byte_level, entries, strip_space)
    mismatch = _first_mismatch(tokenizer, table, pieces)
    if mismatch is not None:
        logger.warning(
            "detokenisation: the token table disagrees with the tokenizer's decoder on ids %s; "
            "piece window",
            mismatch[:32],
        )
        return None
    logger.info("detokenisation: token table (%s)", "byte-level" if byte_level else "byte fallback")
    return table


def _shape(config: dict[str, Any]) -> tuple[bool, bool] | None:
    """(byte_level, strip_space) for a decoder the table reproduces, else None."""
    decoders = config.get("decoders", []) if config.get("type") == "Sequence" else [config]
    types = [decoder.get("type") for decoder in decoders]
    if types == ["ByteLevel"]:
        return True, False
    if types[:3] != ["Replace", "ByteFallback", "Fuse"] or len(types) > 4:
        return None
    replace = decoders[0]
    if replace.get("pattern") != {"String": SP_SPACE} or replace.get("content") != " ":
        return None
    if len(types) == 3:
        return False, False
    strip = decoders[3]
    strip_one_space = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    if any(strip.get(key) != value for key, value in strip_one_space.items()):
        return None
    return False, True


def _sentencepiece_entry(piece: str) -> str | int:
    byte_piece = SP_BYTE_PIECE.fullmatch(piece)
    if byte_piece is not None:
        return int(byte_piece.group(1), 16)
    return piece.replace(SP_SPACE, " ")


def _first_mismatch(
    tokenizer: TextTokenizer, table: DecoderTable, pieces: list[str | None]
) -> list[int] | None:
    """The first check sequence whose text differs between the table and the decoder."""
    join = table.join
    for ids in _check_sequences(table):
        ids = [token_id for token_id in ids if pieces[token_id] is not None]
        if not ids:
            continue
        expected = tokenizer.join_pieces([pieces[token_id] or "" for token_id in ids])
        if join([table.entries[token_id] for token_id in ids]) != expected:
            return ids
    return None


def _check_sequences(table: DecoderTable) -> list[list[int]]:
    """The whole vocabulary in id order, then random mixes of tokens, characters spelled in
    single-byte tokens (whole or cut short; where the vocabulary has those bytes) and stray
    bytes."""
    ids = [token_id for token_id, entry in enumerate(table.entries) if entry is not None]
    byte_ids: dict[int, int] = {}
    for token_id in reversed(ids):
        entry = table.entries[token_id]
        if type(entry) is int:
            byte_ids[entry] = token_id
        elif isinstance(entry, bytes) and len(entry) == 1:
            byte_ids[entry[0]] = token_id
    rng = random.Random(_SAMPLE_SEED)
    sequences = [ids]
    for _ in range(_SAMPLES):
        sequence: list[int] = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            encoded = _random_char(rng).encode("utf-8")
            if kind < 0.1:
                encoded = bytes([rng.randrange(256)])
            elif kind < 0.3:
                encoded = encoded[: rng.randint(1, len(encoded))]
            if kind < 0.6 and all(b in byte_ids for b in encoded):
                sequence.extend(byte_ids[b] for b in encoded)
            else:
                sequence.append(rng.choice(ids))
        sequences.append(sequence)
    return sequences


def _random_char(rng: random.Random) -> str:
    """A character of 1 to 4 UTF-8 bytes (no surrogates)."""
    low, high = rng.choice([(0x20, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0x10000, 0x10FFFF)])
    return chr(rng.randint(low, high))
