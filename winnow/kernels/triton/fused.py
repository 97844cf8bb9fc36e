"""The Triton implementations of the pointwise family and of RoPE fused with the KV write."""

from __future__ import annotations

import torch

from winnow.kernels.attention_metadata import AttentionMetadata
from winnow.kernels.triton import pointwise
from winnow.kernels.triton.backend import TritonAttentionBackend


class TritonPointwise:
    """RMSNorm (with its residual add), RoPE on q and k, SiLU x up: one launch each."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return pointwise.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        return pointwise.rms_norm(residual, weight, eps, delta)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return pointwise.rope_qk(x, x[:, :0], cos, sin)[0]

    def rope_qk(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return pointwise.rope_qk(q, k, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return pointwise.silu_mul(gate_up)


class TritonRopeAttention:
    """A decode-only step: RoPE on q and k, the KV write and attention in one launch (the new
    token's key and value taken from registers). Any other step: RoPE on q and k with the KV
    write in one launch, then the Triton attention over the cache."""

    def __init__(self, attention: TritonAttentionBackend) -> None:
        self.attention = attention

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        self.attention.warm(q, k, v, kv_cache, (cos, sin))
        if attn.is_decode_only:
            return self.attention.rope_decode(q, k, v, cos, sin, kv_cache, attn, sliding_window)
        q, k = pointwise.rope_qk(q, k, cos, sin, v, kv_cache, attn.slot_mapping)
        return self.attention.attend(q, kv_cache, attn, sliding_window)
