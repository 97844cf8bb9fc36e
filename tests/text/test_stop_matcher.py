"""StopMatcher: the automaton's matches and held-back suffix agree with scanning the whole text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from winnow.limits import MAX_STOP_STRING_CHARS, MAX_STOP_TOTAL_CHARS
from winnow.sampling.params import SamplingParamError, SamplingParams
from winnow.text.stop_matcher import StopMatcher


def earliest_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(start, stop) of the match that ends first; on a tie the longer stop."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    return None if not found else min(found)[1:]


def held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop."""
    return max(
        (n for s in stops for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])),
        default=0,
    )


STOPS = st.lists(st.text("abc", min_size=1, max_size=6), min_size=1, max_size=5, unique=True)
CHUNKS = st.lists(st.text("abcd", max_size=5), max_size=12)


@settings(derandomize=True, max_examples=400, deadline=None)
@given(stops=STOPS, chunks=CHUNKS)
def test_fed_in_chunks_it_matches_what_scanning_the_whole_text_finds(
    stops: list[str], chunks: list[str]
) -> None:
    matcher = StopMatcher(stops)
    state, seen = 0, ""
    for chunk in chunks:
        state, consumed, stop = matcher.feed(state, chunk)
        seen += chunk[:consumed]
        if stop is not None:
            assert earliest_stop(seen, stops) == (len(seen) - len(stop), stop)
            assert earliest_stop(seen[:-1], stops) is None
            return
        assert consumed == len(chunk)
        assert earliest_stop(seen, stops) is None
        assert matcher.held(state) == held_suffix(seen, stops)


def test_the_longer_of_two_stops_ending_together_wins() -> None:
    state, consumed, stop = StopMatcher(["b", "ab", "xab"]).feed(0, "zxab")
    assert (consumed, stop) == (4, "xab")


def test_total_stop_length_is_capped() -> None:
    longest = tuple(f"{i}" * MAX_STOP_STRING_CHARS for i in range(4))
    assert sum(map(len, longest)) == MAX_STOP_TOTAL_CHARS
    SamplingParams(stop=longest)
    with pytest.raises(SamplingParamError, match="in all") as info:
        SamplingParams(stop=(*longest, "z"))
    assert info.value.param == "stop"
