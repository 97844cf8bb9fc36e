"""Incremental detokenisation of one generated choice, with stop strings and safe streaming.

Two layers, per docs/sampling.md "Stops" and docs/api.md "Streaming":

1. A `Detokenizer` (from `Detokenizers.new`, winnow/text/detokenizers.py) turns token ids into
   text that is final: it never returns a trailing incomplete UTF-8 character.
2. `TextStream` matches stop strings on that text and holds back the longest suffix that could
   still become a stop string, so no part of a stop string is ever sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from winnow.text.detokenizer import Detokenizer
from winnow.text.stop_matcher import stop_matcher


@dataclass(slots=True)
class TextDelta:
    """What one generated token adds to the choice's text.

    `text` is safe to send now. `stop_string` is set when a stop string matched: generation must
    end, and `text` ends right before the stop string (or includes it when
    `include_stop_str_in_output`).
    """

    text: str
    stop_string: str | None = None


class TextStream:
    """Text of one generated choice, fed one token at a time.

    `append` returns the text that is safe to send now; `flush` (at EOS, max tokens, time limit)
    returns the held-back text that is now final. Concatenating every delta and the flush gives
    the choice's final text.

    Stop strings are matched on the detokenised text across token boundaries by an automaton
    (`winnow.text.stop_matcher`) that only reads the new text: each step costs O(new text),
    however many and however long the stop strings.
    """

    def __init__(
        self,
        detokenizer: Detokenizer,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._detokenizer = detokenizer
        self._stops = stop_matcher(tuple(dict.fromkeys(stop))) if stop else None
        self._state = 0
        self._include_stop = include_stop_str_in_output
        self._pending = ""
        self._stop_string: str | None = None
        self._finished = False

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stop_string

    def append(self, token_id: int) -> TextDelta:
        """Add one generated token. Raises RuntimeError after a stop string or `flush`."""
        if self._finished:
            raise RuntimeError("TextStream already finished (stop string matched or flushed)")
        return self._advance(self._detokenizer.append(token_id))

    def flush(self) -> str:
        """End of generation: return the held-back text, which is now final."""
        if self._finished:
            return ""
        delta = self._advance(self._detokenizer.flush())
        self._finished = True
        rest, self._pending = self._pending, ""
        return delta.text + rest

    def _advance(self, new_text: str) -> TextDelta:
        if self._stops is None:
            return TextDelta(new_text)
        unsent = self._pending + new_text
        self._state, consumed, stop = self._stops.feed(self._state, new_text)
        if stop is not None:
            end = len(self._pending) + consumed
            self._pending = ""
            self._stop_string = stop
            self._finished = True
            return TextDelta(unsent[: end if self._include_stop else end - len(stop)], stop)
        held = len(unsent) - self._stops.held(self._state)
        self._pending = unsent[held:]
        return TextDelta(unsent[:held])
