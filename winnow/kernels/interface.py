"""One interface per operation family a model calls; `Kernels` holds one implementation of each.

The model code describes the network and calls these operations; which implementation runs
them is chosen once at start-up by `select_kernels`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from winnow.kernels.attention_metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Attention with its KV write: caches this step's k/v, then attends over the paged cache."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the step's flat tokens -> output [T, Hq, D]."""
        ...


class PointwiseOps(Protocol):
    """Norms, rotary embedding and the MLP activation."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """residual += delta in place (the residual add); returns rms_norm(residual), new."""
        ...

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] rotated by cos/sin [T, 1, D / 2] (halves layout)."""
        ...

    def rope_qk(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope` of q and of k (one launch where a backend can)."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2 I] (gate, then up) -> silu(gate) * up [T, I]."""
        ...


class RopeAttention(Protocol):
    """RoPE on q and k, the KV write and attention, fused where a backend can (for Triton, all
    three in one decode launch; the KV write inside the rotary kernel before prefill)."""

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
        """Unrotated q [T, Hq, D], k/v [T, Hkv, D] -> attention output [T, Hq, D]."""
        ...


class ProjectionOps(Protocol):
    """The projections' weight layout: a model is built with `nn.Linear`s, and `prepare` may
    replace them (after the weights are loaded) by modules that run another kernel."""

    def prepare(self, model: nn.Module) -> None: ...


class LayerStack(Protocol):
    """Runs a step's decoder layers: one by one, or fused where a backend can (decode steps)."""

    def prepare(self, layers: Iterable[nn.Module]) -> None:
        """Called once after the projections are prepared."""
        ...

    def run(
        self,
        layers: Iterable[nn.Module],
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Updates the residual stream `hidden` [T, hidden] through every layer; returns it."""
        ...


@dataclass
class Kernels:
    """The implementation of each operation family, chosen together (see `select_kernels`)."""

    attention: AttentionBackend
    pointwise: PointwiseOps
    projections: ProjectionOps
    layers: LayerStack
    description: str
    # whether a CUDA graph captured once replays decode steps correctly: the attention reads
    # every length from the metadata's tensors (never its host lists) and its launch shapes
    # only from tensor shapes, which the graph runner keeps fixed per batch size
    decode_graphs: bool = False
    # RoPE, KV write and attention together; None: `pointwise.rope_qk`, then `attention`
    rope_attention: RopeAttention | None = None

    def attend(
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
        """RoPE on q and k, the KV write, attention: unrotated q/k/v -> output [T, Hq, D]."""
        if self.rope_attention is not None:
            return self.rope_attention.forward(q, k, v, cos, sin, kv_cache, attn, sliding_window)
        q, k = self.pointwise.rope_qk(q, k, cos, sin)
        return self.attention.forward(q, k, v, kv_cache, attn, sliding_window)

    def prepare(self, model: nn.Module, layers: Iterable[nn.Module]) -> None:
        """Adapt a loaded model's weights to these kernels (once, after loading)."""
        self.projections.prepare(model)
        self.layers.prepare(layers)
