"""Rotary position embeddings (the "rotate half" layout used by HF Llama-family checkpoints)."""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from winnow.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (fp32, CPU) and the cos/sin scale (yarn's factor).

    Computed under an explicit CPU device so that building the model on "meta" does not touch it.
    """
    with torch.device("cpu"):
        if config.rope_scaling is None:
            exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
            return 1.0 / (config.rope_theta**exponents), 1.0
        if config.hf_config is None:
            raise ValueError(f"rope type {config.rope_type!r} needs the HF config for inv_freq")
        init_fn = ROPE_INIT_FUNCTIONS[config.rope_type]
        inv_freq, scale = init_fn(config.hf_config, torch.device("cpu"))
        return inv_freq.float(), float(scale)


class RotaryEmbedding:
    """Computes cos/sin for a step's positions once; every layer then applies them.

    Deliberately not an nn.Module: inv_freq must stay float32 when the model is cast to bf16/fp16.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq, self.scale = rope_inv_freq(config)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, 1, head_dim // 2], in the activation dtype."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)
