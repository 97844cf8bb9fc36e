"""Incremental detokenisation per token: the Rust `DecodeStream` path against the Python piece
window, in the same process, alternating.

Each round streams the same generated text (prose, code, accents, CJK and emoji, so byte pieces
and held characters occur) through `TextStream` (no stop strings) one token at a time, after a
prompt, on each path in turn; the figure is CPU time of this thread (`time.thread_time`) per
token, the median over rounds. Tokenizers: the demo model's (SentencePiece with byte fallback,
what the host-overhead bench decodes) and SmolLM2's (byte-level BPE, the default model).

    .venv/bin/python bench/detokenize.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from winnow.models import Tokenizer, load_model
from winnow.models.default_model import default_model_dir
from winnow.text import TextStream

TEXT = (
    "The quick brown fox jumps over the lazy dog; then it writes code:\n"
    "    def f(x):\n        return x * 2  # doubled\n"
    "Café, naïve, Straße. 你好，世界！東京 안녕하세요 😀 🦩 👍🏽 ok.\n"
) * 12


class PiecesOnly:
    """The tokenizer without its Rust backend: `TextStream` takes the piece-window path."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def backend(self) -> None:
        return None


def per_token_us(tokenizer: Any, prompt: list[int], ids: list[int]) -> float:
    start = time.thread_time()
    stream = TextStream(tokenizer, prompt)
    for token_id in ids:
        stream.append(token_id)
    stream.flush()
    return 1e6 * (time.thread_time() - start) / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    tokenizers = {
        "demo (SentencePiece)": load_model("demo").tokenizer,
        "SmolLM2 (byte-level BPE)": Tokenizer.from_pretrained(default_model_dir()),
    }
    print("| tokenizer | tokens | DecodeStream us/token | piece window us/token | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, tokenizer in tokenizers.items():
        prompt = tokenizer.encode("Answer the question:", add_special_tokens=False)
        ids = tokenizer.encode(TEXT, add_special_tokens=False)
        paths = {"stream": tokenizer, "pieces": PiecesOnly(tokenizer)}
        times: dict[str, list[float]] = {path: [] for path in paths}
        for _ in range(args.rounds):
            for path, wrapped in paths.items():
                times[path].append(per_token_us(wrapped, prompt, ids))
        stream, pieces = (statistics.median(times[path]) for path in paths)
        print(f"| {name} | {len(ids)} | {stream:.2f} | {pieces:.2f} | {stream / pieces:.2f}x |")


if __name__ == "__main__":
    main()
