"""The table detokeniser against the piece window and `decode`, for every tokenizer the tests
use: random streams of whole tokens, special tokens, characters spelled in byte tokens (whole,
cut short, split between prompt and output), stray bytes and long invalid runs."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.models.helpers import tiny_tokenizer
from winnow.models import Tokenizer
from winnow.text import Detokenizers, build_token_bytes
from winnow.text.detokenizer import MAX_HELD_PIECES, IncrementalDetokenizer

REPLACEMENT = "\ufffd"
STREAMS = 150


# The decoder each tokenizer has: (byte-level, drops one leading space).
DECODERS = {
    "sp": (False, True),
    "bpe": (True, False),
    "demo": (False, True),
    "smollm2": (True, False),
}


@pytest.fixture(scope="module", params=list(DECODERS))
def tokenizer_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def any_tokenizer(request: pytest.FixtureRequest, tokenizer_name: str) -> Tokenizer:
    """Each tokenizer the tests use: the two of tests/text, the demo models' (Mistral v3 with
    the control tokens added) and the default model's (SmolLM2, byte-level BPE)."""
    fixture = {"demo": "demo_model_dir", "smollm2": "smollm2_dir"}.get(tokenizer_name)
    if fixture is None:
        tokenizer: Tokenizer = request.getfixturevalue(f"{tokenizer_name}_tokenizer")
        return tokenizer
    return Tokenizer.from_pretrained(request.getfixturevalue(fixture))


@pytest.fixture(scope="module")
def detokenizers(any_tokenizer: Tokenizer) -> Detokenizers:
    return Detokenizers(any_tokenizer)


def byte_token_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """For each byte, a token that is exactly that byte (a `<0xNN>` piece where there is one)."""
    found: dict[int, int] = {}
    for token_id, raw in enumerate(build_token_bytes(tokenizer)):
        if len(raw) != 1 or token_id in tokenizer.special_ids:
            continue
        if raw[0] not in found or str(tokenizer.piece(token_id)).startswith("<0x"):
            found[raw[0]] = token_id
    assert len(found) >= 235  # SmolLM2 has no token for 21 bytes, 13 of them never in UTF-8
    return found


def random_char(rng: random.Random, byte_ids: dict[int, int]) -> str:
    """A character of 1 to 4 UTF-8 bytes that byte tokens can spell."""
    while True:
        low, high = rng.choice([(0x20, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0x10000, 0x10FFFF)])
        char = chr(rng.randint(low, high))
        if all(b in byte_ids for b in char.encode("utf-8")):
            return char


def random_stream(
    rng: random.Random, tokenizer: Tokenizer, byte_ids: dict[int, int], valid: bool
) -> list[int]:
    """Tokens of whole characters only (`valid`), or anything, invalid UTF-8 included."""
    while True:
        ids = _random_ids(rng, tokenizer, byte_ids, valid)
        # a vocabulary token may end inside a character: draw again for whole characters
        if not valid or REPLACEMENT not in tokenizer.decode(in_vocabulary(tokenizer, ids)):
            return ids


def in_vocabulary(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    return [token_id for token_id in ids if token_id < tokenizer.vocab_size]


def _random_ids(
    rng: random.Random, tokenizer: Tokenizer, byte_ids: dict[int, int], valid: bool
) -> list[int]:
    special = sorted(tokenizer.special_ids)
    ids: list[int] = []
    for _ in range(rng.randint(1, 40)):
        kind = rng.random()
        if kind < 0.35:
            ids.append(rng.randrange(tokenizer.vocab_size))  # may spell part of a character
        elif kind < 0.45:
            ids.append(rng.choice(special))
        elif kind < 0.47:  # a padding row of the embedding, past the vocabulary: no text
            ids.append(tokenizer.vocab_size + rng.randrange(64))
        elif kind < 0.6:
            ids += tokenizer.encode(
                random_char(rng, byte_ids) * rng.randint(1, 3), add_special_tokens=False
            )
        else:
            encoded = random_char(rng, byte_ids).encode("utf-8")
            if not valid and rng.random() < 0.4:
                encoded = encoded[: rng.randint(1, len(encoded))]
            if not valid and rng.random() < 0.1:
                encoded = bytes([rng.choice([0x80, 0xBF, 0xE0, 0xF0])]) * (MAX_HELD_PIECES + 4)
            ids += [byte_ids[b] for b in encoded]
    return ids


def deltas(detokenizer: Any, ids: list[int]) -> list[str]:
    return [detokenizer.append(token_id) for token_id in ids] + [detokenizer.flush()]


def reference(tokenizer: Tokenizer, prompt: list[int], ids: list[int]) -> str:
    """`decode`'s text of the output past the prompt's, where the tokens that add no text are
    the engine's `special_ids` and ids past the vocabulary (as in the piece window): `decode`'s
    own skip list differs for some added tokens (SmolLM2's `<issue_closed>` is special to
    `decode` only, the .model-only Mistral tokenizer's `[REFERENCE_DOC_15]` to the engine only)."""
    prompt, ids = (
        [i for i in in_vocabulary(tokenizer, part) if i not in tokenizer.special_ids]
        for part in (prompt, ids)
    )
    full = tokenizer.decode([*prompt, *ids], skip_special_tokens=False)
    head = tokenizer.decode(prompt, skip_special_tokens=False)
    assert full.startswith(head)
    return full[len(head) :]


def test_every_tokenizer_of_the_tests_gets_a_table(
    tokenizer_name: str, detokenizers: Detokenizers
) -> None:
    table = detokenizers.table
    assert table is not None
    assert (table.byte_level, table.strip_space) == DECODERS[tokenizer_name]


def test_each_token_reads_as_the_decoder_reads_it(
    any_tokenizer: Tokenizer, detokenizers: Detokenizers
) -> None:
    table = detokenizers.table
    assert table is not None
    for token_id in range(any_tokenizer.vocab_size):
        entry = table.entries[token_id]
        if token_id in any_tokenizer.special_ids:
            assert entry is None
            continue
        piece = any_tokenizer.piece(token_id)
        assert piece is not None
        assert table.join([entry]) == any_tokenizer.join_pieces([piece]), (token_id, piece)


@pytest.mark.parametrize("valid", [True, False], ids=["whole-characters", "any-bytes"])
def test_random_streams_step_by_step_as_the_piece_window(
    any_tokenizer: Tokenizer, detokenizers: Detokenizers, valid: bool
) -> None:
    """Same deltas at every step as the piece window; with whole characters, no U+FFFD in a
    delta and the text of `decode`, with a prompt as context (completions), a prompt cut inside
    a character, or none (chat)."""
    rng = random.Random(7)
    byte_ids = byte_token_ids(any_tokenizer)
    bos = [] if any_tokenizer.bos_token_id is None else [any_tokenizer.bos_token_id]
    flamingo = [byte_ids[b] for b in "🦩".encode()]
    for _ in range(STREAMS):
        ids = random_stream(rng, any_tokenizer, byte_ids, valid)
        context = any_tokenizer.encode("Answer:", add_special_tokens=False)
        for prompt in ([], bos, bos + context, context + flamingo[:2]):
            table = deltas(detokenizers.new(prompt), ids)
            window = deltas(IncrementalDetokenizer(any_tokenizer, prompt), ids)
            assert table == window, (prompt, ids)
            if valid and prompt != context + flamingo[:2]:
                assert REPLACEMENT not in "".join(table)
                assert "".join(table) == reference(any_tokenizer, prompt, ids), (prompt, ids)


def test_a_character_split_over_tokens_comes_whole_in_one_delta(
    any_tokenizer: Tokenizer, detokenizers: Detokenizers
) -> None:
    byte_ids = byte_token_ids(any_tokenizer)
    text = "a🦩b你好 𝔘"
    ids = [byte_ids[b] for b in text.encode()]
    got = deltas(detokenizers.new([]), ids)
    assert [d for d in got if d] == ["a", "🦩", "b", "你", "好", " ", "𝔘"]


def metaspace_tokenizer() -> Tokenizer:
    """A real SentencePiece-style tokenizer whose decoder is `Metaspace`, a shape the table does
    not reproduce."""
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False)
    backend.train_from_iterator(["Hello world, the quick brown fox jumps."] * 3, trainer=trainer)
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>"))


@pytest.mark.parametrize("kind", ["metaspace", "no decoder"])
def test_a_decoder_the_table_does_not_know_gets_the_piece_window(kind: str) -> None:
    """`Metaspace`, and the word-level tokenizer of tests/models, which has no decoder."""
    tokenizer = metaspace_tokenizer() if kind == "metaspace" else Tokenizer(tiny_tokenizer(64))
    built = Detokenizers(tokenizer)
    assert built.table is None
    detokenizer = built.new([])
    assert isinstance(detokenizer, IncrementalDetokenizer)
    text = "Hello world, the quick fox." if kind == "metaspace" else "w5 w7 w9 w11"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "".join(deltas(detokenizer, ids)) == tokenizer.decode(ids) == text


class _ClaimsByteLevel:
    """A SentencePiece tokenizer whose decoder configuration says byte-level BPE."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def decoder_config(self) -> dict[str, Any]:
        return {"type": "ByteLevel", "add_prefix_space": True}


def test_a_table_that_disagrees_with_the_decoder_is_not_used(sp_tokenizer: Tokenizer) -> None:
    built = Detokenizers(_ClaimsByteLevel(sp_tokenizer))  # type: ignore[arg-type]
    assert built.table is None
    ids = sp_tokenizer.encode("Hello world 🦩", add_special_tokens=False)
    assert "".join(deltas(built.new([]), ids)) == sp_tokenizer.decode(ids)
