"""Real tokenizers for the text tests, built offline (no hub downloads), as the engine holds
them (`winnow.models.Tokenizer`; `.hf` is the Hugging Face tokenizer inside)."""

from __future__ import annotations

import shutil
from importlib.resources import files

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from winnow.models import Tokenizer as WinnowTokenizer

MISTRAL_V3_MODEL = "mistral_instruct_tokenizer_240323.model.v3"
BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Small multilingual corpus: common words merge into whole tokens, while rarer emoji and CJK
# stay split into byte tokens, which is what the streaming tests need.
_BPE_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Streaming text must never show broken characters to the user.",
    "  Indented code:\n    def f(x):\n        return x + 1\n",
    "Café, naïve, déjà vu, Straße, smörgåsbord, über, façade.",
    "Привет, мир! Как дела? Всё хорошо.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "こんにちは世界。東京は大きな都市です。",
    "안녕하세요 세계. 반갑습니다.",
    "مرحبا بالعالم",
    "Emoji: 😀 😃 😄 👍 🎉 ❤️ 🔥 🚀 and more 😀😀 👍👍",
    "Numbers 0123456789, symbols #$%&*()[]{}<>/\\|~^`'\"",
]


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> WinnowTokenizer:
    """Mistral v3 SentencePiece tokenizer (32768 pieces, `<s>`=1, `</s>`=2, byte fallback)."""
    source = files("mistral_common") / "data" / MISTRAL_V3_MODEL
    directory = tmp_path_factory.mktemp("mistral_v3")
    with source.open("rb") as src, (directory / "tokenizer.model").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return WinnowTokenizer(LlamaTokenizer.from_pretrained(directory))


@pytest.fixture(scope="session")
def bpe_tokenizer() -> WinnowTokenizer:
    """GPT-2 style byte-level BPE trained on `_BPE_CORPUS`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=BPE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_BPE_CORPUS * 3, trainer=trainer)
    return WinnowTokenizer(
        PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            eos_token="<|endoftext|>",
            additional_special_tokens=BPE_SPECIAL_TOKENS[1:],
            clean_up_tokenization_spaces=False,
        )
    )


@pytest.fixture(scope="session", params=["sp", "bpe"])
def tokenizer(request: pytest.FixtureRequest) -> WinnowTokenizer:
    """Each real tokenizer in turn, for tests that hold for both kinds."""
    return request.getfixturevalue(f"{request.param}_tokenizer")
