"""All decoder layers of a decode-only step in one C call (the packed CPU model).

At batch 1 the per-op path spends a share of each step in Python between kernels (module
calls, views, ctypes argument conversion; BENCHMARKS.md, "C decoder stack"); here the
weights' addresses are gathered once and a step passes one struct. The kernels and their order
are the per-op path's, so the results match.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from winnow.kernels.attention_metadata import AttentionMetadata
from winnow.kernels.cpu import cpu_kernels
from winnow.kernels.cpu.packed_linear import PackedLinear


class _Norm(Protocol):
    weight: torch.Tensor
    eps: float


class _Attention(Protocol):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_size: int
    kv_size: int
    sliding_window: int | None
    qkv_proj: nn.Module
    o_proj: nn.Module
    q_norm: _Norm | None
    k_norm: _Norm | None


class _MLP(Protocol):
    intermediate_size: int
    gate_up_proj: nn.Module
    down_proj: nn.Module


class DecoderLayer(Protocol):
    """What the stack reads of a decoder layer (the models' layers have these attributes)."""

    input_norm: _Norm
    post_attn_norm: _Norm
    self_attn: _Attention
    mlp: _MLP


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _projection(module: torch.nn.Module) -> tuple[int | None, int | None]:
    """(packed weight, bias) addresses of a PackedLinear."""
    assert isinstance(module, PackedLinear)
    return _address(module.packed), _address(module.bias)


class DecodeStack:
    """Holds the layers' addresses; `run` updates the residual stream of a decode-only step."""

    def __init__(self, layers: list[DecoderLayer]) -> None:
        first = layers[0].self_attn
        self.q_size = first.q_size
        self.kv_size = first.kv_size
        self.intermediate = layers[0].mlp.intermediate_size
        self.hidden_size = layers[0].input_norm.weight.shape[0]
        self.step = cpu_kernels.DecodeStep(
            hidden_size=self.hidden_size,
            hq=first.num_heads,
            hkv=first.num_kv_heads,
            d=first.head_dim,
            intermediate=self.intermediate,
            eps=layers[0].input_norm.eps,
            scale=first.head_dim**-0.5,
        )
        packed = first.qkv_proj.packed  # every projection is packed in one dtype
        assert isinstance(packed, torch.Tensor)
        self.step.w_type = cpu_kernels.ELEMENT_TYPES[packed.dtype]
        self.layers = (cpu_kernels.DecodeLayer * len(layers))()
        for entry, layer in zip(self.layers, layers, strict=True):
            attn = layer.self_attn
            entry.input_norm = _address(layer.input_norm.weight)
            entry.post_norm = _address(layer.post_attn_norm.weight)
            entry.q_norm = _address(attn.q_norm.weight) if attn.q_norm is not None else None
            entry.k_norm = _address(attn.k_norm.weight) if attn.k_norm is not None else None
            entry.qkv, entry.qkv_bias = _projection(attn.qkv_proj)
            entry.o, entry.o_bias = _projection(attn.o_proj)
            entry.gate_up, entry.gate_up_bias = _projection(layer.mlp.gate_up_proj)
            entry.down, entry.down_bias = _projection(layer.mlp.down_proj)
            entry.window = attn.sliding_window or 0
        self._caches: list[int] = []

    @staticmethod
    def supports(layers: list[DecoderLayer]) -> bool:
        """Whether these layers fit the C stack: packed projections and a head_dim the decode
        kernel reads (a multiple of 8)."""
        attn = layers[0].self_attn
        projections = [
            module
            for layer in layers
            for module in (
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
            )
        ]
        return attn.head_dim % 8 == 0 and all(isinstance(m, PackedLinear) for m in projections)

    def run(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> None:
        """hidden [T, hidden] contiguous fp32, one new token per sequence (token i belongs to
        sequence i); cos/sin [T, 1, head_dim / 2]; every cache contiguous, all in one dtype of
        `cpu_kernels.ELEMENT_TYPES`."""
        self._point_at(kv_caches)
        tokens = hidden.shape[0]
        scratch = torch.empty(
            tokens * (2 * self.hidden_size + 3 * self.q_size + 2 * self.kv_size)
            + tokens * 3 * self.intermediate
            + self.kv_size,
            dtype=torch.float32,
        )
        rows = torch.arange(tokens)
        tables = attn.block_tables.contiguous()
        seq_lens = attn.seq_lens_tensor.contiguous()
        slots = attn.slot_mapping.contiguous()
        step = self.step
        step.block_size = attn.block_size
        step.hidden, step.t, step.scratch = hidden.data_ptr(), tokens, scratch.data_ptr()
        step.cos, step.sin = cos.contiguous().data_ptr(), sin.contiguous().data_ptr()
        step.slots, step.rows = slots.data_ptr(), rows.data_ptr()
        step.block_tables, step.seq_lens = tables.data_ptr(), seq_lens.data_ptr()
        step.table_width = tables.shape[1]
        step.nthreads = torch.get_num_threads()
        cpu_kernels.decode_layers(self.layers, step)

    def _point_at(self, kv_caches: list[torch.Tensor]) -> None:
        """Enter each layer's key and value cache addresses when the caches change."""
        addresses = [cache.data_ptr() for cache in kv_caches]
        if addresses == self._caches:
            return
        for entry, cache, address in zip(self.layers, kv_caches, addresses, strict=True):
            assert cache.is_contiguous() and cache.dtype == kv_caches[0].dtype
            entry.kcache = address
            entry.vcache = cache[1].data_ptr()
        self.step.kv_type = cpu_kernels.ELEMENT_TYPES[kv_caches[0].dtype]
        self._caches = addresses
