"""The piece window's algorithm over a `DecoderTable`: the same text, step by step, without
calling the tokenizer.

`IncrementalDetokenizer` keeps the last emitted pieces as left context and the pieces not
emitted yet; each step it decodes context + pending, holds everything while that text ends in
U+FFFD (at most `MAX_HELD_PIECES`), and emits what lies past the context's text. Here the same
runs on table entries with the table's `join`, which agrees with the tokenizer's decoder (checked
when the table was built), so the deltas are those of the piece window, including its handling
of invalid bytes and byte-fallback runs that regroup.

Most steps take a shortcut that needs no join: nothing is pending, and the new token cannot
change the context's text, so its own text is the delta:
- byte-level: the context's text does not end in U+FFFD (its bytes end on a whole character),
  and the token's bytes decode to text that does not end in U+FFFD;
- byte fallback: the token is a non-empty piece (not a byte) not ending in U+FFFD; it ends any
  byte run of the context. Its leading space is dropped when the decoder strips one and the
  context adds no text (the start of a reply).
"""

from __future__ import annotations

from collections.abc import Sequence

from winnow.text.decoder_table import REPLACEMENT_CHAR, DecoderTable, Entry
from winnow.text.detokenizer import (
    MAX_HELD_PIECES,
    PROMPT_CONTEXT_PIECES,
    Detokenizer,
    common_prefix_len,
)


def table_detokenizer(table: DecoderTable, prompt_token_ids: Sequence[int]) -> Detokenizer:
    """A detokeniser for one choice whose text follows `prompt_token_ids` (the context)."""
    if table.byte_level:
        return _ByteLevelDetokenizer(table, prompt_token_ids)
    return _ByteFallbackDetokenizer(table, prompt_token_ids)


class _TableDetokenizer:
    """`_context`: the entries emitted last (or the prompt's last ones); `_pending`: entries
    not emitted yet. Subclasses keep what their shortcut needs to know about the context."""

    __slots__ = ("_context", "_entries", "_join", "_pending")

    def __init__(self, table: DecoderTable, prompt_token_ids: Sequence[int]) -> None:
        self._entries = table.entries
        self._join = table.join
        self._pending: list[Entry] = []
        context: list[Entry] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == PROMPT_CONTEXT_PIECES:
                break
            entry = self._entries[token_id] if token_id < len(self._entries) else None
            if entry is not None:
                context.append(entry)
        context.reverse()
        self._set_context(context)

    def _set_context(self, context: list[Entry]) -> None:
        self._context = context

    def append(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty). Subclasses take
        their shortcut first, then call this."""
        entries = self._entries
        entry = entries[token_id] if token_id < len(entries) else None
        if entry is None:
            return ""
        pending = self._pending
        pending.append(entry)
        text = self._join([*self._context, *pending])
        if text.endswith(REPLACEMENT_CHAR) and len(pending) < MAX_HELD_PIECES:
            return ""
        delta = text[common_prefix_len(self._join(self._context), text) :]
        self._pending = []
        self._set_context(pending)
        return delta

    def flush(self) -> str:
        """Release the held text (an incomplete character shows as U+FFFD, as `decode` does)."""
        if not self._pending:
            return ""
        text = self._join([*self._context, *self._pending])
        return text[common_prefix_len(self._join(self._context), text) :]


class _ByteLevelDetokenizer(_TableDetokenizer):
    """`_whole`: the context's text does not end in U+FFFD."""

    __slots__ = ("_whole",)

    def _set_context(self, context: list[Entry]) -> None:
        self._context = context
        self._whole = not self._join(context).endswith(REPLACEMENT_CHAR)

    def append(self, token_id: int) -> str:
        entries = self._entries
        if self._whole and not self._pending and token_id < len(entries):
            entry = entries[token_id]
            if entry is not None:
                assert isinstance(entry, bytes)
                text = entry.decode("utf-8", errors="replace")
                if not text.endswith(REPLACEMENT_CHAR):
                    self._context = [entry]
                    return text
        return super().append(token_id)


class _ByteFallbackDetokenizer(_TableDetokenizer):
    """`_bare`: the decoder strips a leading space and the context adds no text, so the strip
    falls on the next text."""

    __slots__ = ("_bare", "_strip")

    def __init__(self, table: DecoderTable, prompt_token_ids: Sequence[int]) -> None:
        self._strip = table.strip_space
        super().__init__(table, prompt_token_ids)

    def _set_context(self, context: list[Entry]) -> None:
        self._context = context
        self._bare = self._strip and all(entry == "" for entry in context)

    def append(self, token_id: int) -> str:
        entries = self._entries
        if not self._pending and token_id < len(entries):
            entry = entries[token_id]
            if type(entry) is str and entry and entry[-1] != REPLACEMENT_CHAR:
                self._context = [entry]
                if self._bare:
                    self._bare = False
                    return entry[1:] if entry[0] == " " else entry
                return entry
        return super().append(token_id)
