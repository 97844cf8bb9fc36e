"""TextStream: incremental detokenisation, broken-UTF-8 holdback, stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.text.helpers import new_detokenizer
from winnow.text.stream import TextDelta, TextStream

PROPERTY = settings(
    derandomize=True,
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
REPLACEMENT = "\ufffd"
TEXTS = [
    "Hello world, this is a test.",
    "  two leading spaces\n    and indented lines\n\nend",
    "I ❤️ 🦩 and 🫠! 👍🏽 𝔘",
    "你好，世界！東京 안녕하세요",
    "Mixed: Café 😀 你好 Straße 🚀 ok.",
]
# Characters whose UTF-8 is split over byte tokens in both tokenizers.
SPLIT_EMOJI = "🦩🫠𝔘𓀀ꙮ👍🏽"
ALPHABET = "ab c.\nÉé你好界😀🦩🫠𝔘"


def prompt_ids(tokenizer: Any) -> list[int]:
    """A prompt ending in ordinary text, BOS first when the tokenizer has one."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode("Answer:", add_special_tokens=False)


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def reference(tokenizer: Any, prompt: Sequence[int], ids: Sequence[int]) -> str:
    """The output text as decoding the whole sequence shows it, past the prompt's text."""
    full = tokenizer.decode([*prompt, *ids], skip_special_tokens=True)
    head = tokenizer.decode(list(prompt), skip_special_tokens=True)
    assert full.startswith(head)
    return full[len(head) :]


def run(
    tokenizer: Any, prompt: Sequence[int], ids: Sequence[int], window: bool = False, **kwargs: Any
) -> tuple[list[TextDelta], str, TextStream]:
    """Feed ids until a stop string matches; flush when none does. `window`: through the piece
    window rather than the detokeniser the engine picks."""
    stream = TextStream(new_detokenizer(tokenizer, prompt, window), **kwargs)
    deltas = []
    for token_id in ids:
        deltas.append(stream.append(token_id))
        if deltas[-1].stop_string is not None:
            return deltas, "", stream
    return deltas, stream.flush(), stream


def joined(deltas: list[TextDelta], tail: str = "") -> str:
    return "".join(d.text for d in deltas) + tail


def expected_with_stops(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Cut at the match that ends first (ties: the longer stop); None when nothing matches."""
    matches = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not matches:
        return text, None
    end, start, stop = min(matches)
    return text[: end if include else start], stop


# --- detokenisation -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(tokenizer: Any, text: str) -> None:
    prompt = prompt_ids(tokenizer)
    ids = encode(tokenizer, text)
    deltas, tail, stream = run(tokenizer, prompt, ids)
    assert joined(deltas, tail) == reference(tokenizer, prompt, ids)


@pytest.mark.parametrize("text", TEXTS)
def test_without_prompt_text_equals_plain_decode(tokenizer: Any, text: str) -> None:
    ids = encode(tokenizer, text)
    bos_only = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for prompt in ([], bos_only):
        deltas, tail, _ = run(tokenizer, prompt, ids)
        assert joined(deltas, tail) == tokenizer.decode(ids, skip_special_tokens=True)


def test_first_sentencepiece_token_keeps_its_space(sp_tokenizer: Any) -> None:
    prompt = prompt_ids(sp_tokenizer)
    ids = encode(sp_tokenizer, "Hello world")
    assert sp_tokenizer.hf.convert_ids_to_tokens(ids) == ["▁Hello", "▁world"]
    deltas, tail, _ = run(sp_tokenizer, prompt, ids)
    assert [d.text for d in deltas] == [" Hello", " world"]
    assert tail == ""


def test_first_byte_level_token_neither_gains_nor_loses_a_space(bpe_tokenizer: Any) -> None:
    prompt = prompt_ids(bpe_tokenizer)
    for text in ("Hello world", " Hello world"):
        deltas, tail, _ = run(bpe_tokenizer, prompt, encode(bpe_tokenizer, text))
        assert joined(deltas, tail) == text


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    prompt = prompt_ids(tokenizer)
    eos = tokenizer.hf.eos_token_id
    ids = encode(tokenizer, "Hello 你好")
    mixed = [ids[0], eos, *ids[1:], eos]
    deltas, tail, _ = run(tokenizer, prompt, mixed)
    assert joined(deltas, tail) == reference(tokenizer, prompt, ids)
    assert deltas[1].text == deltas[-1].text == ""


def test_special_tokens_in_prompt_are_not_context(sp_tokenizer: Any) -> None:
    inst = sp_tokenizer.hf.convert_tokens_to_ids(["[INST]", "[/INST]"])
    prompt = [1, inst[0], *encode(sp_tokenizer, "hi"), inst[1]]
    ids = encode(sp_tokenizer, "Hello")
    deltas, tail, _ = run(sp_tokenizer, prompt, ids)
    assert joined(deltas, tail) == reference(sp_tokenizer, prompt, ids) == " Hello"


@PROPERTY
@given(text=st.text(alphabet=ALPHABET, max_size=40))
def test_property_deltas_concatenate_to_decode(tokenizer: Any, text: str) -> None:
    prompt = prompt_ids(tokenizer)
    ids = encode(tokenizer, text)
    deltas, tail, _ = run(tokenizer, prompt, ids)
    assert joined(deltas, tail) == reference(tokenizer, prompt, ids)


class _WindowSpy:
    """Delegates to a tokenizer and records the longest piece list decoded at once."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.longest = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def join_pieces(self, pieces: list[str]) -> str:
        self.longest = max(self.longest, len(pieces))
        return self._tokenizer.join_pieces(pieces)


def test_decode_window_stays_small(tokenizer: Any) -> None:
    spy = _WindowSpy(tokenizer)
    ids = encode(tokenizer, " ".join(TEXTS) * 20)
    assert len(ids) > 500
    deltas, tail, _ = run(spy, prompt_ids(tokenizer), ids, window=True)
    assert joined(deltas, tail) == reference(tokenizer, prompt_ids(tokenizer), ids)
    assert spy.longest <= 12


# --- broken UTF-8 -----------------------------------------------------------------------------


def test_emoji_bytes_are_held_until_complete(sp_tokenizer: Any) -> None:
    ids = encode(sp_tokenizer, "🦩")
    pieces = sp_tokenizer.hf.convert_ids_to_tokens(ids)
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0xA9>"]
    deltas, tail, _ = run(sp_tokenizer, prompt_ids(sp_tokenizer), ids)
    assert [d.text for d in deltas] == [" ", "", "", "", "🦩"]
    assert tail == ""


@pytest.mark.parametrize("text", [SPLIT_EMOJI, "a🦩b🫠 c𝔘 你好 ꙮ", "👍🏽👍🏽 🫠🫠"])
def test_no_delta_contains_broken_utf8(tokenizer: Any, text: str) -> None:
    ids = encode(tokenizer, text)
    pieces_split = [tokenizer.decode([i]) for i in ids]
    assert any(REPLACEMENT in p for p in pieces_split), "precondition: bytes split over tokens"
    prompt = prompt_ids(tokenizer)
    deltas, tail, _ = run(tokenizer, prompt, ids)
    assert all(REPLACEMENT not in d.text for d in deltas)
    assert joined(deltas, tail) == reference(tokenizer, prompt, ids)


@PROPERTY
@given(text=st.text(alphabet=SPLIT_EMOJI + "你界 x", max_size=30))
def test_property_no_broken_utf8(tokenizer: Any, text: str) -> None:
    prompt = prompt_ids(tokenizer)
    ids = encode(tokenizer, text)
    deltas, tail, _ = run(tokenizer, prompt, ids)
    assert all(REPLACEMENT not in d.text for d in deltas)
    assert REPLACEMENT not in tail
    assert joined(deltas, tail) == reference(tokenizer, prompt, ids)


def test_flush_releases_an_incomplete_character(sp_tokenizer: Any) -> None:
    ids = encode(sp_tokenizer, "x🦩")[:-2]
    prompt = prompt_ids(sp_tokenizer)
    deltas, tail, _ = run(sp_tokenizer, prompt, ids)
    assert REPLACEMENT not in joined(deltas)
    assert REPLACEMENT in tail
    assert joined(deltas, tail) == reference(sp_tokenizer, prompt, ids)


def test_character_split_between_prompt_and_output_is_emitted_whole(sp_tokenizer: Any) -> None:
    flamingo = encode(sp_tokenizer, "🦩")
    prompt = prompt_ids(sp_tokenizer) + flamingo[:3]
    deltas, tail, _ = run(sp_tokenizer, prompt, flamingo[3:] + encode(sp_tokenizer, "ok"))
    assert [d.text for d in deltas] == ["", "🦩", " ok"]
    assert tail == ""


def test_endless_invalid_bytes_are_not_held_forever(sp_tokenizer: Any) -> None:
    spy = _WindowSpy(sp_tokenizer)
    prompt = prompt_ids(sp_tokenizer)
    ids = [sp_tokenizer.hf.convert_tokens_to_ids("<0x80>")] * 200
    deltas, tail, _ = run(spy, prompt, ids, window=True)
    assert joined(deltas).startswith(REPLACEMENT * 100)
    assert joined(deltas, tail) == reference(sp_tokenizer, prompt, ids)
    assert spy.longest <= 40


# --- stop strings -----------------------------------------------------------------------------


def stop_case(tokenizer: Any, text: str, stops: Sequence[str], include: bool = False) -> None:
    """Stream `text` with `stops`; check the result against the reference cut."""
    prompt = prompt_ids(tokenizer)
    ids = encode(tokenizer, text)
    full = reference(tokenizer, prompt, ids)
    want, want_stop = expected_with_stops(full, stops, include)
    deltas, tail, stream = run(
        tokenizer, prompt, ids, stop=stops, include_stop_str_in_output=include
    )
    assert joined(deltas, tail) == want
    assert stream.stop_string == want_stop
    assert [d.stop_string for d in deltas if d.stop_string] == ([want_stop] if want_stop else [])
    streamed = joined(deltas[:-1]) if want_stop else joined(deltas, tail)
    for stop in stops:
        assert stop not in streamed


def token_spans(tokenizer: Any, text: str) -> list[str]:
    """The text each token of `text` adds after the standard prompt."""
    prompt = prompt_ids(tokenizer)
    ids = encode(tokenizer, text)
    texts = [reference(tokenizer, prompt, ids[:i]) for i in range(len(ids) + 1)]
    return [b[len(a) :] for a, b in zip(texts, texts[1:], strict=False)]


def test_stop_inside_one_token(sp_tokenizer: Any) -> None:
    assert "▁world" in sp_tokenizer.hf.convert_ids_to_tokens(encode(sp_tokenizer, "Hello world"))
    stop_case(sp_tokenizer, "Hello world again", ["orl"])
    _, _, stream = run(sp_tokenizer, prompt_ids(sp_tokenizer), encode(sp_tokenizer, "Hi world"))
    assert stream.stop_string is None


@pytest.mark.parametrize(
    ("text", "stop", "n_tokens"),
    [("Hello world again", "lo wor", 2), ("Hello world again", "o world a", 3)],
)
def test_stop_spanning_tokens(sp_tokenizer: Any, text: str, stop: str, n_tokens: int) -> None:
    spans = token_spans(sp_tokenizer, text)
    full = "".join(spans)
    start = full.index(stop)
    ends = [sum(map(len, spans[: i + 1])) for i in range(len(spans))]
    first = next(i for i, e in enumerate(ends) if e > start)
    last = next(i for i, e in enumerate(ends) if e >= start + len(stop))
    assert last - first + 1 == n_tokens
    stop_case(sp_tokenizer, text, [stop])
    deltas, _, _ = run(
        sp_tokenizer, prompt_ids(sp_tokenizer), encode(sp_tokenizer, text), stop=[stop]
    )
    assert len(deltas) == last + 1


@pytest.mark.parametrize("text", ["Hello world", "你好世界 again"])
def test_stop_at_the_very_start(tokenizer: Any, text: str) -> None:
    first = reference(tokenizer, [], encode(tokenizer, text))[:3]
    stop_case(tokenizer, text, [first])
    deltas, _, _ = run(tokenizer, [], encode(tokenizer, text), stop=[first])
    assert joined(deltas) == ""
    assert deltas[-1].stop_string == first


def test_several_stops_in_one_step_earliest_end_wins(sp_tokenizer: Any) -> None:
    text = "Hello world"
    stops = ["llo world", "o wo"]  # both complete with "▁world"; "o wo" ends first
    deltas, _, _ = run(
        sp_tokenizer, prompt_ids(sp_tokenizer), encode(sp_tokenizer, text), stop=stops
    )
    assert [d.text for d in deltas] == [" He", "ll"]
    assert deltas[-1].stop_string == "o wo"
    stop_case(sp_tokenizer, text, stops)


def test_same_end_prefers_the_longer_stop(tokenizer: Any) -> None:
    stops = ["world", "rld", "Hello world"]
    stop_case(tokenizer, "Hello world again", stops)
    deltas, _, stream = run(tokenizer, [], encode(tokenizer, "Hello world again"), stop=stops)
    assert stream.stop_string == "Hello world"
    assert joined(deltas) == ""


def test_include_stop_str_in_output(tokenizer: Any) -> None:
    stop_case(tokenizer, "Hello world again", ["lo wor"], include=True)
    deltas, _, _ = run(
        tokenizer,
        [],
        encode(tokenizer, "Hello world again"),
        stop=["lo wor"],
        include_stop_str_in_output=True,
    )
    assert joined(deltas) == "Hello wor"


def test_prefix_candidate_that_fails_is_released(sp_tokenizer: Any) -> None:
    ids = encode(sp_tokenizer, "Hello world")
    deltas, tail, stream = run(sp_tokenizer, prompt_ids(sp_tokenizer), ids, stop=["Hello!"])
    assert [d.text for d in deltas] == [" ", "Hello world"]
    assert tail == ""
    assert stream.stop_string is None


def test_held_stop_prefix_is_released_by_flush(tokenizer: Any) -> None:
    ids = encode(tokenizer, "Hello wor")
    deltas, tail, _ = run(tokenizer, [], ids, stop=["world"])
    assert joined(deltas) == "Hello "
    assert tail == "wor"


def test_nothing_after_a_stop(tokenizer: Any) -> None:
    stream = TextStream(new_detokenizer(tokenizer, prompt_ids(tokenizer)), stop=["wor"])
    ids = encode(tokenizer, "Hello world and more")
    delta, sent = TextDelta(""), ""
    for token_id in ids:
        delta = stream.append(token_id)
        sent += delta.text
        if delta.stop_string:
            break
    assert delta.stop_string == "wor"
    with pytest.raises(RuntimeError):
        stream.append(ids[-1])
    assert stream.flush() == ""
    assert sent.endswith("Hello ")


def test_append_after_flush_raises(tokenizer: Any) -> None:
    stream = TextStream(new_detokenizer(tokenizer, []))
    stream.append(encode(tokenizer, "Hi")[0])
    stream.flush()
    assert stream.flush() == ""
    with pytest.raises(RuntimeError):
        stream.append(0)


def test_empty_stop_string_is_rejected(tokenizer: Any) -> None:
    with pytest.raises(ValueError):
        TextStream(new_detokenizer(tokenizer, []), stop=["ok", ""])


@PROPERTY
@given(
    text=st.text(alphabet="ab c😀你\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab c😀你\n", min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
)
def test_property_stops(tokenizer: Any, text: str, stops: list[str], include: bool) -> None:
    stop_case(tokenizer, text, stops, include)
