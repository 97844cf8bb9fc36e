"""Winnow's C kernels (AVX2 / AVX-512, fp32 activations) behind the operation families.

Each op falls back to the torch reference for an input its kernel does not take, so a model
never has to ask which ran.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Protocol, cast

import torch
from torch import nn

from winnow.kernels.attention_metadata import AttentionMetadata
from winnow.kernels.cpu import cpu_kernels
from winnow.kernels.cpu.decode_stack import DecoderLayer, DecodeStack
from winnow.kernels.cpu.packed_linear import PackedLinear, lossless_weight_dtype, pack_linears
from winnow.kernels.torch_attention import TorchAttentionBackend
from winnow.kernels.torch_ops import LayerLoop, TorchPointwise

logger = logging.getLogger(__name__)


class CpuAttentionBackend(TorchAttentionBackend):
    """TorchAttentionBackend with decodes read in place from the paged cache by a C kernel
    (fp32 queries, an fp32/fp16/bf16 cache, head_dim a multiple of 8), instead of gathering
    every block into a batch."""

    def decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        seqs: list[int] | None,
        sliding_window: int | None,
    ) -> torch.Tensor:
        readable = kv_cache.dtype in cpu_kernels.ELEMENT_TYPES and kv_cache.is_contiguous()
        if q.dtype != torch.float32 or q.shape[-1] % 8 or not readable:
            return super().decode(q, kv_cache, attn, seqs, sliding_window)
        tokens, rows = _decode_rows(attn, seqs)
        out = torch.empty(tokens.numel(), *q.shape[1:], dtype=q.dtype)
        cpu_kernels.paged_decode(
            q.contiguous(), out, tokens, rows, kv_cache, attn.block_tables.contiguous(),
            attn.seq_lens_tensor.contiguous(), sliding_window or 0,
        )  # fmt: skip
        return out


def _decode_rows(
    attn: AttentionMetadata, seqs: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat token index, sequence index) of each decode, built once per step."""
    key = ("decode-rows", None if seqs is None else tuple(seqs))
    if key not in attn.memo:
        starts = list(itertools.accumulate(attn.query_lens, initial=0))
        chosen = list(range(len(attn.query_lens))) if seqs is None else seqs
        tokens = torch.tensor([starts[i] for i in chosen], dtype=torch.long)
        attn.memo[key] = (tokens, torch.tensor(chosen, dtype=torch.long))
    rows = attn.memo[key]
    assert isinstance(rows, tuple)
    return rows


class CpuPointwise(TorchPointwise):
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = cpu_kernels.rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps) if out is None else out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out = cpu_kernels.rope(x, cos, sin)
        return super().rope(x, cos, sin) if out is None else out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = cpu_kernels.silu_mul(gate_up)
        return super().silu_mul(gate_up) if out is None else out


class _CausalLM(Protocol):
    """What packing reads of a model: its token embedding and its head (None when tied)."""

    embed_tokens: nn.Embedding
    lm_head: nn.Module | None


class PackedProjections:
    """Moves every projection and the output head onto the packed C kernel (`PackedLinear`).
    The panels are 16-bit when every weight holds exactly in 16 bits (see
    `lossless_weight_dtype`). A tied head gets its own packed copy; embedding lookups keep the
    original."""

    def prepare(self, model: nn.Module) -> None:
        lm = cast(_CausalLM, model)
        linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
        head = [lm.embed_tokens.weight] if lm.lm_head is None else []
        weight_dtype = lossless_weight_dtype(linears + head)
        dtype_name = str(weight_dtype).removeprefix("torch.")
        logger.info("CPU kernels: projection weights packed as %s", dtype_name)
        pack_linears(model, weight_dtype)
        if lm.lm_head is None:
            lm.lm_head = PackedLinear(lm.embed_tokens.weight.to(weight_dtype), None)


class DecodeStackLayers(LayerLoop):
    """Decode-only steps run every layer in one C call (`DecodeStack`) where the layers fit it;
    other steps call the layers one by one."""

    def __init__(self) -> None:
        self.stack: DecodeStack | None = None

    def prepare(self, layers: Iterable[nn.Module]) -> None:
        decoder_layers = cast(list[DecoderLayer], list(layers))
        if DecodeStack.supports(decoder_layers):
            self.stack = DecodeStack(decoder_layers)

    def run(
        self,
        layers: Iterable[nn.Module],
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        if self.stack is not None and attn.is_decode_only:
            self.stack.run(hidden, cos, sin, kv_caches, attn)
            return hidden
        return super().run(layers, hidden, cos, sin, kv_caches, attn)
