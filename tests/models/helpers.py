"""Test helpers: tiny random HF reference models and a minimal paged-cache driver for our model."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from winnow.models import AttentionMetadata, LoadedModel, allocate_kv_cache

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

# name -> (config class, extra config kwargs). Each exercises one feature of the model code.
ARCHITECTURES: dict[str, tuple[type[transformers.PretrainedConfig], dict[str, object]]] = {
    "llama": (transformers.LlamaConfig, {"tie_word_embeddings": False}),
    "llama-tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "llama3-rope": (
        transformers.LlamaConfig,
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama-mha-bias": (
        transformers.LlamaConfig,
        {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    ),
    "mistral-sliding": (transformers.MistralConfig, {"head_dim": 16, "sliding_window": 6}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    "qwen2-yarn": (
        transformers.Qwen2Config,
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 24}),
}


def make_hf_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny HF reference model with every parameter (norms and biases too) randomised."""
    config_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model.eval()


def save_hf_model(model: transformers.PreTrainedModel, path: Path, **kwargs: object) -> Path:
    """save_pretrained plus a word-level tokenizer covering the tiny vocabulary."""
    model.save_pretrained(str(path), **kwargs)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(str(path))
    return path


def tiny_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def hf_logits(model: transformers.PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    """Reference float32 logits [len, vocab] of one full sequence."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


class PagedRunner:
    """Drives our model like the engine does: flat tokens, per-sequence block tables taken from a
    shuffled free list (so tables are non-contiguous), one forward per `step`."""

    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int = 96,
        block_size: int = 4,
        seed: int = 0,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.loaded = loaded
        self.block_size = block_size
        dtype = kv_dtype or next(loaded.model.parameters()).dtype
        self.kv_caches = allocate_kv_cache(loaded.config, num_blocks, block_size, dtype, "cpu")
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, chunks: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """Append each chunk's tokens to its sequence; returns each chunk's logits [len, vocab]."""
        ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens, tables = [], [], []
        for seq, tokens in chunks:
            start = self.lens.get(seq, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(table)
            self.lens[seq] = end
        attn = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size)
        hidden = self.loaded.model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, attn)
        logits = self.loaded.model.compute_logits(hidden)
        return list(logits.split(query_lens))
