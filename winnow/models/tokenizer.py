"""Tokenizer: a thin wrapper over a Hugging Face tokenizer plus the model's chat template; it
has the shape `winnow.text.TextTokenizer` asks for, so the engine hands it to text handling."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from winnow.models.config import read_generation_eos, read_model_eos
from winnow.models.content_encoding import ContentEncoder, ContentMarks, ContentSpanError


class ChatTemplateError(ValueError):
    """The chat template is missing or failed to render these messages."""


class Tokenizer:
    def __init__(
        self, hf: PreTrainedTokenizerBase, extra_eos_token_ids: list[int] | None = None
    ) -> None:
        self.hf = hf
        eos = [] if hf.eos_token_id is None else [int(hf.eos_token_id)]
        for token_id in extra_eos_token_ids or []:
            if token_id not in eos:
                eos.append(token_id)
        self.eos_token_ids: list[int] = eos
        self.vocab_size: int = len(hf)
        self.special_ids = frozenset(int(token_id) for token_id in hf.all_special_ids)
        self._content = ContentEncoder(hf)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        model_dir: str | Path | None = None,
    ) -> Tokenizer:
        """Load from a directory; `chat_template` (Jinja source or a file path) overrides.

        The end-of-sequence ids come from `model_dir`'s configs (default: `path`), so a
        tokenizer loaded from elsewhere still stops where the model does."""
        path = Path(path)
        hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if chat_template is not None:
            hf.chat_template = _template_source(chat_template)
        configs = path if model_dir is None else Path(model_dir)
        return cls(hf, read_model_eos(configs) + read_generation_eos(configs))

    def copy(self) -> Tokenizer:
        """An independent copy, for another thread (fast tokenizers are not re-entrant)."""
        return Tokenizer(copy.deepcopy(self.hf), self.eos_token_ids)

    @cached_property
    def longest_token_chars(self) -> int:
        """Characters of the longest token as the vocabulary spells it: no token covers more of
        a text (byte-level spellings have one character per byte), so a text longer than
        `n` times this has more than `n` tokens."""
        return max((len(token) for token in self.hf.get_vocab()), default=1)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def chat_template(self) -> str | None:
        template = self.hf.chat_template
        return template if isinstance(template, str) else None

    def special_token_id(self, text: str) -> int | None:
        """The id of an added/special token spelled `text`, if the vocabulary has one."""
        token_id = self.hf.get_added_vocab().get(text)
        return None if token_id is None else int(token_id)

    def piece(self, token_id: int) -> str | None:
        piece = self.hf.convert_ids_to_tokens(token_id)
        return piece if isinstance(piece, str) else None

    def join_pieces(self, pieces: Sequence[str]) -> str:
        return str(self.hf.convert_tokens_to_string(list(pieces)))

    def added_tokens(self) -> Mapping[int, str]:
        return {token_id: token.content for token_id, token in self.hf.added_tokens_decoder.items()}

    def vocab(self) -> Mapping[str, int]:
        return self.hf.get_vocab()

    def decoder_config(self) -> dict[str, Any] | None:
        decoder = getattr(getattr(self.hf, "backend_tokenizer", None), "decoder", None)
        return None if decoder is None else dict(json.loads(decoder.__getstate__()))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; control tokens (BOS/EOS, [INST], ...) are dropped unless asked for."""
        return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def render_chat_text(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The chat prompt as text, ending with the assistant generation prompt."""
        if not self.hf.chat_template:
            raise ChatTemplateError(
                "this model has no chat template; pass one with --chat-template"
            )
        try:
            text = self.hf.apply_chat_template(
                messages,
                tools=cast("list[dict[Any, Any] | Callable[..., Any]] | None", tools),
                add_generation_prompt=True,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise ChatTemplateError(f"chat template failed to render the messages: {exc}") from exc
        if not isinstance(text, str):
            raise ChatTemplateError("chat template did not render to a single string")
        return text

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        *,
        special_tokens_in_content: bool = False,
    ) -> list[int]:
        """Prompt token ids for a chat; the template itself supplies BOS and control tokens.

        Text in messages, tools and template variables (`bos_token` set to "[INST]" in
        `template_kwargs`) that spells a control token is encoded as text, so a client cannot
        fake a turn boundary; `special_tokens_in_content` parses it as control tokens.
        """
        text = self.render_chat_text(messages, tools, template_kwargs)
        requested = [messages, tools, template_kwargs]
        if special_tokens_in_content or not self._content.spells_control_token(requested):
            return self.encode(text, add_special_tokens=False)
        marks = ContentMarks(self._content)
        marked = self.render_chat_text(
            marks.wrap(messages), marks.wrap(tools), marks.wrap(template_kwargs)
        )
        try:
            return self._content.encode(text, marks.spans(marked, text))
        except ContentSpanError as exc:
            raise ChatTemplateError(
                f"messages contain control-token text that this chat template does not let the "
                f"server keep as plain text ({exc}); remove it from the messages"
            ) from exc


def _template_source(chat_template: str) -> str:
    """vLLM-style: the argument is a path to a template file if such a file exists."""
    candidate = Path(chat_template).expanduser()
    if "\n" not in chat_template and len(chat_template) < 4096 and candidate.is_file():
        return candidate.read_text()
    return chat_template
