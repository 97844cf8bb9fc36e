"""ModelConfig from HF configs, RoPE frequencies, and KV-cache sizing."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from winnow.models import ModelConfig, allocate_kv_cache, kv_cache_bytes_per_block
from winnow.models.rope import rope_inv_freq

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)


def test_llama_fields() -> None:
    hf = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, vocab_size=500, eos_token_id=2)
    config = ModelConfig.from_hf_config(hf)
    assert config.architecture == "llama"
    assert (config.hidden_size, config.num_layers, config.num_heads) == (64, 3, 4)
    assert (config.num_kv_heads, config.head_dim, config.intermediate_size) == (2, 16, 96)
    assert config.vocab_size == 500
    assert not (config.qkv_bias or config.o_bias or config.qk_norm or config.tie_word_embeddings)
    assert config.rope_type == "default" and config.rope_theta == 10000.0
    assert config.sliding_window is None


def test_qwen2_has_qkv_bias_only() -> None:
    config = ModelConfig.from_hf_config(transformers.Qwen2Config(**SMALL))
    assert config.architecture == "qwen2"
    assert config.qkv_bias and not config.o_bias and not config.qk_norm


def test_qwen3_explicit_head_dim_and_qk_norm() -> None:
    config = ModelConfig.from_hf_config(transformers.Qwen3Config(**SMALL, head_dim=40))
    assert config.architecture == "qwen3"
    assert config.head_dim == 40 and config.qk_norm and not config.qkv_bias


def test_mistral_sliding_window() -> None:
    hf = transformers.MistralConfig(**SMALL, head_dim=16, sliding_window=128)
    config = ModelConfig.from_hf_config(hf)
    assert config.architecture == "mistral" and config.sliding_window == 128
    hf_full = transformers.MistralConfig(**SMALL, sliding_window=None)
    assert ModelConfig.from_hf_config(hf_full).sliding_window is None


def test_llama3_rope_scaling_matches_transformers() -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = transformers.LlamaConfig(
        **SMALL, rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072
    )
    config = ModelConfig.from_hf_config(hf)
    assert config.rope_type == "llama3" and config.rope_theta == 500000.0
    inv_freq, scale = rope_inv_freq(config)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    torch.testing.assert_close(inv_freq, expected.float())
    assert scale == 1.0


def test_default_rope_matches_transformers() -> None:
    hf = transformers.Qwen3Config(**SMALL, head_dim=40, rope_theta=1000000.0)
    inv_freq, _ = rope_inv_freq(ModelConfig.from_hf_config(hf))
    expected = 1.0 / (1000000.0 ** (torch.arange(0, 40, 2, dtype=torch.int64).float() / 40))
    assert torch.equal(inv_freq, expected)


@pytest.mark.parametrize(
    ("hf", "message"),
    [
        (transformers.GPT2Config(), "unsupported model architecture"),
        (transformers.LlamaConfig(**SMALL, hidden_act="gelu"), "hidden_act"),
        (
            transformers.LlamaConfig(**SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            "unsupported rope type 'dynamic'",
        ),
    ],
)
def test_unsupported_configs_raise(hf: transformers.PretrainedConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(hf)


def test_kv_cache_layout_and_size() -> None:
    config = ModelConfig.from_hf_config(
        transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=24)
    )
    caches = allocate_kv_cache(
        config, num_blocks=5, block_size=8, dtype=torch.bfloat16, device="cpu"
    )
    assert len(caches) == 3
    assert all(c.shape == (2, 5, 8, 2, 24) and c.dtype == torch.bfloat16 for c in caches)
    per_block = kv_cache_bytes_per_block(config, 8, torch.bfloat16)
    assert per_block == 2 * 8 * 2 * 24 * 2 * 3
    assert per_block * 5 == sum(c.numel() * c.element_size() for c in caches)
