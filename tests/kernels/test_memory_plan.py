"""KV-cache sizing arithmetic (given memory figures and model shapes) and per-device defaults."""

from __future__ import annotations

import pytest
import torch
import transformers

from winnow.config import STEP_DEFAULTS, EngineConfig
from winnow.engine.memory_plan import gpu_kv_budget, plan_kv_cache
from winnow.models import ModelConfig, kv_cache_bytes_per_block

GIB = 2**30


def llama_8b_shape() -> ModelConfig:
    hf = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
    )
    return ModelConfig.from_hf_config(hf)


def test_bytes_per_block_of_the_8b_shape() -> None:
    """32 layers x (K and V) x 16 tokens x 8 kv heads x 128 dims x 2 bytes = 2 MiB in bf16."""
    config = llama_8b_shape()
    assert kv_cache_bytes_per_block(config, 16, torch.bfloat16) == 32 * 2 * 16 * 8 * 128 * 2
    assert kv_cache_bytes_per_block(config, 16, torch.float32) == 4 * 2**20


def test_gpu_budget_leaves_weights_and_peak_activations_out() -> None:
    """A 141 GiB card, 16 GiB in use after loading (weights, CUDA context), 3 GiB of peak
    activations, utilization 0.9: 126.9 - 16 - 3 GiB for the cache."""
    budget = gpu_kv_budget(141 * GIB, 125 * GIB, 3 * GIB, 0.9)
    assert budget == int(141 * GIB * 0.9) - 16 * GIB - 3 * GIB
    assert gpu_kv_budget(80 * GIB, 10 * GIB, 5 * GIB, 0.9) < 0  # nothing left


def test_blocks_from_the_budget_and_max_model_len_from_one_sequence() -> None:
    """The 8B shape in bf16 with 10 GiB for the cache: 5120 blocks of 2 MiB; one sequence can
    then hold (5120 - 1) * 16 = 81904 tokens, less than the model's 131072: the default is cut.
    With 20 GiB the whole context fits."""
    per_block = kv_cache_bytes_per_block(llama_8b_shape(), 16, torch.bfloat16)
    plan = plan_kv_cache(10 * GIB, per_block, 16, 131072, None, 256)
    assert plan.num_blocks == 5120
    assert plan.max_model_len == 5119 * 16
    assert plan.capped
    roomy = plan_kv_cache(20 * GIB, per_block, 16, 131072, None, 256)
    assert roomy.num_blocks == 10240
    assert roomy.max_model_len == 131072 and not roomy.capped


def test_max_num_seqs_full_contexts_cap_the_pool() -> None:
    plan = plan_kv_cache(10**12, 1000, 16, 131072, 4096, 8)
    assert plan.num_blocks == 8 * (4096 // 16) + 1
    assert plan.max_model_len == 4096 and not plan.capped
    roomy = plan_kv_cache(10**12, 1000, 16, 131072, 4096, None)  # an explicit pool: no cap
    assert roomy.num_blocks == 10**9


def test_requested_length_beyond_the_models_is_the_models() -> None:
    plan = plan_kv_cache(10**9, 1000, 16, 2048, 100_000, 4)
    assert plan.max_model_len == 2048 and not plan.capped


def test_partial_block_rounds_up_and_a_budget_under_two_blocks_is_refused() -> None:
    plan = plan_kv_cache(10**9, 1000, 16, 100, None, 1)
    assert plan.num_blocks == 7 + 1  # ceil(100 / 16) blocks for the one sequence, plus block 0
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        plan_kv_cache(1999, 1000, 16, 100, None, 1)
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        plan_kv_cache(-5 * GIB, 1000, 16, 100, None, 1)


def test_step_sizes_default_per_device_and_explicit_values_win() -> None:
    cuda, cpu = EngineConfig().for_device("cuda"), EngineConfig().for_device("cpu")
    assert (cuda.max_num_seqs, cuda.max_num_batched_tokens) == STEP_DEFAULTS["cuda"] == (256, 8192)
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == STEP_DEFAULTS["cpu"] == (64, 512)
    chosen = EngineConfig(max_num_seqs=3, max_num_batched_tokens=40, block_size=32)
    resolved = chosen.for_device("cuda")
    assert (resolved.max_num_seqs, resolved.max_num_batched_tokens) == (3, 40)
    assert resolved.block_size == 32 and not resolved.enforce_eager
