"""text: what generated token ids become as text. The incremental detokenisers (`Detokenizers`:
a per-tokenizer table, else the piece window), stop-string holdback (`TextStream`) and the
per-token bytes of logprobs (`build_token_bytes`), over any tokenizer of the `TextTokenizer`
shape (`winnow.models.Tokenizer` is one). Knows nothing about HTTP, scheduling or tensors."""

from winnow.text.detokenizer import Detokenizer
from winnow.text.detokenizers import Detokenizers
from winnow.text.stream import TextDelta, TextStream
from winnow.text.token_bytes import build_token_bytes, token_text
from winnow.text.tokenizer import TextTokenizer

__all__ = [
    "Detokenizer",
    "Detokenizers",
    "TextDelta",
    "TextStream",
    "TextTokenizer",
    "build_token_bytes",
    "token_text",
]
