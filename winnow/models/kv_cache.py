"""Paged KV cache: per layer one [2, num_blocks, block_size, num_kv_heads, head_dim] tensor."""

from __future__ import annotations

import torch

from winnow.models.config import ModelConfig


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers (keys and values)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * config.num_kv_heads * config.head_dim * element_size
    return per_layer * config.num_layers


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """Zero-filled cache tensors, one per layer, in the layout the attention backends expect."""
    shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
