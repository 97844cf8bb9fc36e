"""Encoding a rendered chat so that text a client sent can never become a control token.

A chat template renders one string in which its own markers (`[INST]`, `<|im_end|>`, ...) sit next
to the clients' message text. Encoding that string with control tokens parsed would turn message
text that spells a marker into the marker itself, letting a user fake a turn boundary. Tokenizers
have no notion of "this stretch came from a variable", so this module recovers it: every string in
the request that spells a control token is wrapped in unique markers, the template is rendered a
second time, and the marker positions give the content spans of the real rendering. Each stretch
of text between two of the template's own control tokens that overlaps a content span is then
encoded with control tokens split (as plain text).

Hand-written because neither transformers nor tokenizers offers span-aware encoding.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as FastTokenizer
from transformers import PreTrainedTokenizerBase

# A non-special added token put in front of a stretch encoded on its own, so that the stretch
# starts where it starts in the whole prompt (after a split) rather than at offset 0: sentencepiece
# pre-tokenizers add a leading "▁" only to the text at offset 0.
_SENTINEL = "\ue000winnow-stretch\ue001"

Span = tuple[int, int]


class ContentSpanError(ValueError):
    """The template changed message text so much that its spans cannot be found again."""


class ContentEncoder:
    """Knows one tokenizer's control tokens; encodes renderings with content spans as text.

    Not thread-safe: like the Hugging Face tokenizer it wraps, each thread needs its own.
    """

    def __init__(self, hf: PreTrainedTokenizerBase) -> None:
        self._hf = hf
        # Control tokens: added tokens flagged special, plus those the tokenizer config lists as
        # special while the fast tokenizer does not (Mistral's [REFERENCE_DOC_n]). Other added
        # tokens (Qwen's <think>, <tool_call>) are words the model writes, and stay tokens.
        listed = set(hf.all_special_tokens)
        control = {
            token_id: token.content
            for token_id, token in hf.added_tokens_decoder.items()
            if token.special or token.content in listed
        }
        self._control_ids = frozenset(control)
        self._control_texts = sorted(set(control.values()), key=len, reverse=True)
        self._pattern = re.compile(_trie_pattern(self._control_texts)) if control else None
        self._splitting: FastTokenizer | None = None
        self._sentinel_id = -1

    def spells_control_token(self, value: Any) -> bool:
        """Whether any string inside `value` (nested lists and dicts) contains a control token."""
        if self._pattern is None:
            return False
        if isinstance(value, str):
            return self._pattern.search(value) is not None
        if isinstance(value, dict):
            return any(self.spells_control_token(item) for item in value.values())
        if isinstance(value, list | tuple):
            return any(self.spells_control_token(item) for item in value)
        return False

    def encode(self, text: str, content_spans: list[Span]) -> list[int]:
        """Ids of `text` with control tokens parsed, except that each stretch between two of the
        template's control tokens that overlaps a content span is encoded as plain text."""
        encoding = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = []
        stretch: list[int] = []
        stretch_start = 0
        for token_id, (start, end) in zip(
            encoding["input_ids"], encoding["offset_mapping"], strict=True
        ):
            if token_id in self._control_ids and not _overlaps(content_spans, start, end):
                ids += self._stretch(text, stretch_start, start, stretch, content_spans)
                ids.append(token_id)
                stretch, stretch_start = [], end
            else:
                stretch.append(token_id)
        ids += self._stretch(text, stretch_start, len(text), stretch, content_spans)
        return ids

    def _stretch(
        self, text: str, start: int, end: int, parsed: list[int], content_spans: list[Span]
    ) -> list[int]:
        if start == end or not _overlaps(content_spans, start, end):
            return parsed
        splitting = self._splitting_tokenizer()
        if start == 0:
            return list(splitting.encode(text[:end], add_special_tokens=False).ids)
        ids = splitting.encode(_SENTINEL + text[start:end], add_special_tokens=False).ids
        assert ids[0] == self._sentinel_id, "the sentinel did not stay one token"
        return list(ids[1:])

    def _splitting_tokenizer(self) -> FastTokenizer:
        """A copy of the fast tokenizer that leaves control tokens in text as text, plus the
        sentinel (a non-special added token, which is still split out)."""
        if self._splitting is None:
            backend = getattr(self._hf, "backend_tokenizer", None)
            if backend is None:
                raise ContentSpanError("this tokenizer cannot encode special tokens as text")
            splitting = FastTokenizer.from_str(backend.to_str())
            splitting.add_special_tokens(
                [AddedToken(text, special=True, normalized=False) for text in self._control_texts]
            )
            splitting.add_tokens([AddedToken(_SENTINEL, special=False, normalized=False)])
            splitting.encode_special_tokens = True
            sentinel_id = splitting.token_to_id(_SENTINEL)
            assert sentinel_id is not None
            self._sentinel_id = sentinel_id
            self._splitting = splitting
        return self._splitting


class ContentMarks:
    """Unique open/close marks wrapped around request strings before a second rendering."""

    def __init__(self, encoder: ContentEncoder) -> None:
        nonce = secrets.token_hex(6)
        self.open = f"\ue002{nonce}\ue003"
        self.close = f"\ue004{nonce}\ue005"
        self._encoder = encoder
        self._marks = re.compile(re.escape(self.open) + "|" + re.escape(self.close))

    def wrap(self, value: Any) -> Any:
        """A copy of `value` whose strings that spell a control token are wrapped in marks,
        whitespace at either end left outside (so templates that trim content still do)."""
        if isinstance(value, str):
            if not self._encoder.spells_control_token(value):
                return value
            core = value.strip()
            head = value[: len(value) - len(value.lstrip())]
            tail = value[len(head) + len(core) :]
            return f"{head}{self.open}{core}{self.close}{tail}"
        if isinstance(value, dict):
            return {key: self.wrap(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.wrap(item) for item in value]
        return value

    def spans(self, marked: str, plain: str) -> list[Span]:
        """Content spans in `plain`, the rendering without marks, from `marked`, the one with."""
        spans: list[Span] = []
        pieces: list[str] = []
        length = 0
        opened: int | None = None
        cursor = 0
        for match in self._marks.finditer(marked):
            piece = marked[cursor : match.start()]
            pieces.append(piece)
            length += len(piece)
            cursor = match.end()
            if match.group() == self.open:
                if opened is not None:
                    raise ContentSpanError("nested content marks")
                opened = length
            else:
                if opened is None:
                    raise ContentSpanError("a content mark closes before it opens")
                spans.append((opened, length))
                opened = None
        pieces.append(marked[cursor:])
        if opened is not None or "".join(pieces) != plain:
            raise ContentSpanError("the chat template changes message text")
        return spans


def _trie_pattern(words: list[str]) -> str:
    """A regex matching any of `words`, shaped as their prefix tree: a plain alternation of
    hundreds of control tokens ("[control_8]", "[control_9]", ...) is tried branch by branch at
    every "[" of a long message."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}
    return _node_pattern(trie)


def _node_pattern(node: dict[str, Any]) -> str:
    ends_here = "" in node
    branches = [re.escape(char) + _node_pattern(child) for char, child in node.items() if char]
    if not branches:
        return ""
    alternation = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return f"(?:{alternation})?" if ends_here else alternation


def _overlaps(spans: list[Span], start: int, end: int) -> bool:
    return any(span_start < end and start < span_end for span_start, span_end in spans)
