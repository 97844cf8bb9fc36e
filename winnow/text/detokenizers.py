"""Which detokeniser a tokenizer's choices get: the table (`table_detokenizer`) when the
tokenizer's decoder is one `build_decoder_table` reproduces and the table passed its check at
build, else the piece window (`IncrementalDetokenizer`), which works for any decoder."""

from __future__ import annotations

from collections.abc import Sequence

from winnow.text.decoder_table import build_decoder_table
from winnow.text.detokenizer import Detokenizer, IncrementalDetokenizer
from winnow.text.table_detokenizer import table_detokenizer
from winnow.text.tokenizer import TextTokenizer


class Detokenizers:
    """Built once per tokenizer (the table costs a pass over the vocabulary); `new` per choice."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self.table = build_decoder_table(tokenizer)

    def new(self, prompt_token_ids: Sequence[int]) -> Detokenizer:
        """A detokeniser for one choice whose text follows `prompt_token_ids`."""
        if self.table is None:
            return IncrementalDetokenizer(self._tokenizer, prompt_token_ids)
        return table_detokenizer(self.table, prompt_token_ids)
