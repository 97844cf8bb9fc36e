"""The torch reference for the non-attention families: runs on any device and dtype."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from winnow.kernels.attention_metadata import AttentionMetadata


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, head_dim] (any strides) by position; returns a new contiguous tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out


class TorchPointwise:
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, weight.shape, weight, eps)

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        return self.rms_norm(residual.add_(delta), weight, eps)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)

    def rope_qk(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope(q, cos, sin), self.rope(k, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        half = gate_up.shape[-1] // 2
        hidden = F.silu(gate_up[:, :half])
        return hidden.mul_(gate_up[:, half:])


class TorchProjections:
    """Keeps the model's `nn.Linear`s (torch's matmul)."""

    def prepare(self, model: nn.Module) -> None:
        return None


class LayerLoop:
    """Calls each decoder layer in turn."""

    def prepare(self, layers: Iterable[nn.Module]) -> None:
        return None

    def run(
        self,
        layers: Iterable[nn.Module],
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        pending: torch.Tensor | None = None
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            pending = layer(hidden, cos, sin, kv_cache, attn, pending)
        return hidden if pending is None else hidden.add_(pending)
