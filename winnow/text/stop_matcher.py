"""Stop strings matched as text streams in, in time proportional to the new text only.

An Aho-Corasick automaton over the stop strings: its state after each character is the longest
suffix of the text so far that is a prefix of some stop string. That suffix is exactly what a
stream must hold back (it could still become a stop string), and a state that ends a stop string
is a match. Scanning the held-back window again for every token cost up to
O(stops x longest stop^2) per token; this costs O(new characters) amortised, whatever the stops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from functools import lru_cache


class StopMatcher:
    """The automaton of one set of stop strings (immutable, shared by every stream using it)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        ends: list[str | None] = [None]
        for stop in stops:
            node = 0
            for char in stop:
                child = self._goto[node].get(char)
                if child is None:
                    child = len(self._goto)
                    self._goto[node][char] = child
                    self._goto.append({})
                    self._depth.append(self._depth[node] + 1)
                    ends.append(None)
                node = child
            ends[node] = stop
        self._chars = frozenset("".join(stops))
        self._fail = [0] * len(self._goto)
        # The longest stop string that ends at this state's text (its own, or a suffix's).
        self._match: list[str | None] = list(ends)
        queue = deque(self._goto[0].values())
        while queue:
            node = queue.popleft()
            for char, child in self._goto[node].items():
                fallback = self._fail[node]
                while fallback and char not in self._goto[fallback]:
                    fallback = self._fail[fallback]
                self._fail[child] = self._goto[fallback].get(char, 0)
                if self._match[child] is None:
                    self._match[child] = self._match[self._fail[child]]
                queue.append(child)

    def feed(self, state: int, text: str) -> tuple[int, int, str | None]:
        """Advance from `state` over `text`: (new state, characters of `text` consumed, the stop
        string matched). Stops at the first match, which ends earliest; of the stops ending
        there, the longest."""
        if self._chars.isdisjoint(text):  # no stop string has these characters: back to the root
            return (0 if text else state), len(text), None
        goto, fail, match = self._goto, self._fail, self._match
        for consumed, char in enumerate(text, 1):
            while state and char not in goto[state]:
                state = fail[state]
            state = goto[state].get(char, 0)
            if match[state] is not None:
                return state, consumed, match[state]
        return state, len(text), None

    def held(self, state: int) -> int:
        """How many trailing characters could still become a stop string."""
        return self._depth[state]


@lru_cache(maxsize=256)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """One automaton per distinct set of stops (every choice of a request shares it)."""
    return StopMatcher(stops)
