"""Per-vocabulary byte table for logprobs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from winnow.text.token_bytes import (
    TokenizerKind,
    build_token_bytes,
    detect_tokenizer_kind,
    token_text,
)

PROPERTY = settings(
    derandomize=True,
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
STRINGS = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnewlines",
    "Café naïve Straße",
    "你好，世界 東京",
    "emoji 🦩 🫠 😀 👍🏽 𝔘 𓀀 ꙮ",
]


@pytest.fixture(scope="module")
def sp_table(sp_tokenizer: Any) -> list[bytes]:
    return build_token_bytes(sp_tokenizer)


@pytest.fixture(scope="module")
def bpe_table(bpe_tokenizer: Any) -> list[bytes]:
    return build_token_bytes(bpe_tokenizer)


def encoded_bytes(tokenizer: Any, table: list[bytes], text: str) -> tuple[bytes, str]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return b"".join(table[i] for i in ids), tokenizer.decode(ids)


def test_tokenizer_kind_from_decoder(sp_tokenizer: Any, bpe_tokenizer: Any) -> None:
    assert detect_tokenizer_kind(sp_tokenizer) is TokenizerKind.SENTENCEPIECE
    assert detect_tokenizer_kind(bpe_tokenizer) is TokenizerKind.BYTE_LEVEL


class _VocabOnly:
    """A tokenizer without a fast backend: only its vocabulary tells the kind."""

    def __init__(self, pieces: list[str]) -> None:
        self._vocab = {p: i for i, p in enumerate(pieces)}

    def vocab(self) -> dict[str, int]:
        return self._vocab

    def decoder_config(self) -> None:
        return None


@pytest.mark.parametrize(
    ("pieces", "kind"),
    [
        (["▁the", "▁a", "b", "Ġc"], TokenizerKind.SENTENCEPIECE),
        (["Ġthe", "Ġa", "b", "▁c"], TokenizerKind.BYTE_LEVEL),
    ],
)
def test_tokenizer_kind_from_vocab(pieces: list[str], kind: TokenizerKind) -> None:
    assert detect_tokenizer_kind(_VocabOnly(pieces)) is kind


def test_unknown_tokenizer_kind_is_an_error() -> None:
    with pytest.raises(ValueError):
        detect_tokenizer_kind(_VocabOnly(["a", "b", "##c"]))


def test_table_covers_the_vocabulary(
    sp_tokenizer: Any, sp_table: list[bytes], bpe_tokenizer: Any, bpe_table: list[bytes]
) -> None:
    assert len(sp_table) == sp_tokenizer.vocab_size == 32768
    assert len(bpe_table) == bpe_tokenizer.vocab_size


def test_sentencepiece_byte_pieces(sp_tokenizer: Any, sp_table: list[bytes]) -> None:
    assert sp_table[sp_tokenizer.hf.convert_tokens_to_ids("<0xF0>")] == b"\xf0"
    for byte in range(256):
        token_id = sp_tokenizer.hf.convert_tokens_to_ids(f"<0x{byte:02X}>")
        assert sp_table[token_id] == bytes([byte])


def test_sentencepiece_word_marker_is_a_space(sp_tokenizer: Any, sp_table: list[bytes]) -> None:
    for piece, expected in [("▁", b" "), ("▁▁", b"  "), ("▁Hello", b" Hello")]:
        assert sp_table[sp_tokenizer.hf.convert_tokens_to_ids(piece)] == expected


def test_special_tokens_map_to_their_content(
    sp_tokenizer: Any, sp_table: list[bytes], bpe_tokenizer: Any, bpe_table: list[bytes]
) -> None:
    assert sp_table[1] == b"<s>"
    assert sp_table[2] == b"</s>"
    assert sp_table[sp_tokenizer.hf.convert_tokens_to_ids("[INST]")] == b"[INST]"
    for token in bpe_tokenizer.hf.all_special_tokens:
        assert bpe_table[bpe_tokenizer.hf.convert_tokens_to_ids(token)] == token.encode()


@pytest.mark.parametrize("text", STRINGS)
def test_sentencepiece_bytes_concatenate_to_utf8(
    sp_tokenizer: Any, sp_table: list[bytes], text: str
) -> None:
    raw, decoded = encoded_bytes(sp_tokenizer, sp_table, text)
    # SentencePiece prepends `▁` to the text; decode drops that one space again.
    assert raw == b" " + decoded.encode()


@pytest.mark.parametrize("text", STRINGS)
def test_byte_level_bytes_concatenate_to_utf8(
    bpe_tokenizer: Any, bpe_table: list[bytes], text: str
) -> None:
    raw, decoded = encoded_bytes(bpe_tokenizer, bpe_table, text)
    assert raw == decoded.encode() == text.encode()


@PROPERTY
@given(text=st.text(min_size=1, max_size=30))
def test_property_bytes_concatenate_to_utf8(
    sp_tokenizer: Any, sp_table: list[bytes], bpe_tokenizer: Any, bpe_table: list[bytes], text: str
) -> None:
    raw, decoded = encoded_bytes(sp_tokenizer, sp_table, text)
    assert raw == b" " + decoded.encode()
    raw, decoded = encoded_bytes(bpe_tokenizer, bpe_table, text)
    assert raw == decoded.encode()


def test_every_sentencepiece_id_agrees_with_decode(
    sp_tokenizer: Any, sp_table: list[bytes]
) -> None:
    # A leading piece keeps decode's one-space strip off the token under test.
    anchor = sp_tokenizer.hf.convert_tokens_to_ids("a")
    for token_id, raw in enumerate(sp_table):
        assert sp_tokenizer.hf.decode([anchor, token_id]) == "a" + token_text(raw), token_id


def test_every_byte_level_id_agrees_with_decode(bpe_tokenizer: Any, bpe_table: list[bytes]) -> None:
    for token_id, raw in enumerate(bpe_table):
        assert bpe_tokenizer.hf.decode([token_id]) == token_text(raw), token_id


def test_token_text_shows_partial_utf8_as_replacement() -> None:
    assert token_text(b" hi") == " hi"
    assert token_text("🦩".encode()[:2]) == "\ufffd"
    assert token_text(b"\xf0") == "\ufffd"
