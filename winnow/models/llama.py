"""Native Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

Tokens are flat ([T], sequence after sequence). Projections are fused: one QKV matmul and one
gate/up matmul per layer; `load_weights` maps HF checkpoint names onto that layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from winnow.distributed.group import TensorParallel
from winnow.distributed.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_logits,
)
from winnow.distributed.partition import Partition
from winnow.kernels import AttentionMetadata, Kernels, reference_kernels
from winnow.models.config import ModelConfig
from winnow.models.rope import RotaryEmbedding


class SliceSource(Protocol):
    """A safetensors slice of a checkpoint tensor: only the part indexed is read."""

    def __getitem__(self, index: Any) -> torch.Tensor: ...

    def get_shape(self) -> list[int]: ...


TensorSource = torch.Tensor | SliceSource


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.kernels = kernels

    @property
    def args(self) -> tuple[torch.Tensor, float]:
        """(weight, eps), as the pointwise norms take them."""
        return self.weight, self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.pointwise.rms_norm(x, self.weight, self.eps)


def _linear(
    in_features: int, out_features: int, bias: bool, tp: TensorParallel | None, row: bool
) -> nn.Linear:
    """A projection whose features are already this rank's (the config is the rank's slice):
    plain `nn.Linear` without tensor parallel, else column- or row-parallel."""
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if row:
        return RowParallelLinear(in_features, out_features, bias, tp)
    return ColumnParallelLinear(in_features, out_features, bias=bias)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, kernels: Kernels, tp: TensorParallel | None) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.sliding_window = config.sliding_window
        self.kernels = kernels
        self.qkv_proj = _linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, config.qkv_bias, tp, row=False
        )
        self.o_proj = _linear(self.q_size, config.hidden_size, config.o_bias, tp, row=True)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, kernels)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, kernels)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q = qkv[:, : self.q_size].view(tokens, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size]
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.kernels.attend(q, k, v, cos, sin, kv_cache, attn, self.sliding_window)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, kernels: Kernels, tp: TensorParallel | None) -> None:
        super().__init__()
        self.kernels = kernels
        self.intermediate_size = size = config.intermediate_size
        self.gate_up_proj = _linear(config.hidden_size, 2 * size, config.mlp_bias, tp, row=False)
        self.down_proj = _linear(size, config.hidden_size, config.mlp_bias, tp, row=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.pointwise.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, kernels: Kernels, tp: TensorParallel | None) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.self_attn = Attention(config, kernels, tp)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.mlp = MLP(config, kernels, tp)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        pending: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adds `pending` (the layer before's output) to the residual stream `hidden` in place,
        then this layer's attention output; returns this layer's MLP output, not yet added.
        Each residual add thus rides in the RMSNorm kernel that follows it."""
        pointwise = self.input_norm.kernels.pointwise
        if pending is None:
            normed = self.input_norm(hidden)
        else:
            normed = pointwise.add_rms_norm(hidden, pending, *self.input_norm.args)
        out = self.self_attn(normed, cos, sin, kv_cache, attn)
        return self.mlp(pointwise.add_rms_norm(hidden, out, *self.post_attn_norm.args))


class LlamaForCausalLM(nn.Module):
    """`tp`: this process's tensor-parallel group (size > 1), None: the whole model here.
    `layer_config` is the config of this rank's slice (its heads, KV heads and intermediate
    size), what its layers and its KV cache are sized by; `config` stays the whole model's."""

    def __init__(
        self, config: ModelConfig, kernels: Kernels | None = None, tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.partition = None if self.tp is None else Partition(config, self.tp.rank, self.tp.size)
        local = config if self.partition is None else self.partition.local_config()
        self.layer_config = local
        self.kernels = kernels = kernels or reference_kernels()
        self.embed_tokens: nn.Embedding | VocabParallelEmbedding = (
            nn.Embedding(config.vocab_size, config.hidden_size)
            if self.partition is None or self.tp is None
            else VocabParallelEmbedding(self.partition, config.hidden_size, self.tp)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(local, kernels, self.tp) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.lm_head: nn.Linear | ParallelLMHead | None = None
        if not config.tie_word_embeddings:
            self.lm_head = (
                nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                if self.partition is None
                else ParallelLMHead(self.partition, config.hidden_size)
            )
        self.rotary = RotaryEmbedding(config)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Flat tokens [T] -> final-norm hidden states [T, hidden]; caches their k/v."""
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        hidden = self.kernels.layers.run(self.layers, hidden, cos, sin, kv_caches, attn)
        return self.norm(hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden rows [N, hidden] -> float32 logits [N, vocab] (tensor parallel: on rank 0;
        the other ranks get their shard's)."""
        if self.tp is not None:
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            return vocab_parallel_logits(hidden, weight, self.tp, self.config.vocab_size)
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def prepare_kernels(self) -> None:
        """Let the kernels adapt the loaded weights (e.g. pack projections); once, after loading."""
        self.kernels.prepare(self, list(self.layers))

    def load_weights(self, weights: Iterable[tuple[str, TensorSource]]) -> None:
        """Copy HF-named checkpoint tensors into the fused layout; all params must be filled.

        A source is a tensor or a safetensors slice; under tensor parallel only this rank's
        part of it is read."""
        params = dict(self.named_parameters())
        filled: set[tuple[str, int]] = set()
        for hf_name, source in weights:
            target = self._native_target(hf_name)
            if target is None:
                continue
            name, shard, start = target
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} does not fit this model config")
            tensor = self._read_slice(hf_name, source)
            dest = params[name].data
            if start is not None:
                dest = dest.narrow(0, start, tensor.shape[0])
            if dest.shape != tensor.shape:
                got, want = tuple(tensor.shape), tuple(dest.shape)
                raise ValueError(f"{hf_name}: checkpoint shape {got} != expected {want}")
            dest.copy_(tensor)
            filled.add((name, shard))
        missing = sorted(
            name
            for name, shards in self._expected_shards().items()
            for shard in range(shards)
            if (name, shard) not in filled
        )
        if missing:
            raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}")

    def _read_slice(self, hf_name: str, source: TensorSource) -> torch.Tensor:
        """The part of a checkpoint tensor this rank holds (all of it without tensor parallel)."""
        cut = None
        if self.partition is not None:
            name = hf_name.removeprefix("model.")
            match = _LAYER_PARAM.fullmatch(name)
            module = match.group(2) if match else name.rsplit(".", 1)[0]
            cut = self.partition.source_slice(module)
        ndim = source.dim() if isinstance(source, torch.Tensor) else len(source.get_shape())
        if cut is None or cut[0] >= ndim:
            return source[:]
        dim, start, length = cut
        return source[start : start + length] if dim == 0 else source[:, start : start + length]

    def _native_target(self, hf_name: str) -> tuple[str, int, int | None] | None:
        """(parameter name, shard index, row offset or None) for an HF name; None = ignore."""
        # a vocab shard fills the first rows of its padded parameter
        vocab_start = None if self.partition is None else 0
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        if hf_name == "lm_head.weight":
            return None if self.lm_head is None else ("lm_head.weight", 0, vocab_start)
        name = hf_name.removeprefix("model.")
        if name == "embed_tokens.weight":
            return name, 0, vocab_start
        match = _LAYER_PARAM.fullmatch(name)
        if match is None:
            return name, 0, None
        layer, module, kind = match.groups()
        local = self.layer_config
        if module in _QKV_SHARDS:
            shard = _QKV_SHARDS[module]
            q_size = local.num_heads * local.head_dim
            kv_size = local.num_kv_heads * local.head_dim
            start = (0, q_size, q_size + kv_size)[shard]
            return f"layers.{layer}.self_attn.qkv_proj.{kind}", shard, start
        if module in _GATE_UP_SHARDS:
            shard = _GATE_UP_SHARDS[module]
            start = shard * local.intermediate_size
            return f"layers.{layer}.mlp.gate_up_proj.{kind}", shard, start
        return f"layers.{layer}.{_LAYER_RENAMES.get(module, module)}.{kind}", 0, None

    def _expected_shards(self) -> dict[str, int]:
        """How many checkpoint tensors fill each parameter (3 for fused QKV, 2 for gate/up)."""
        return {
            name: 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 1
            for name, _ in self.named_parameters()
        }


_LAYER_PARAM = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV_SHARDS = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
_GATE_UP_SHARDS = {"mlp.gate_proj": 0, "mlp.up_proj": 1}
_LAYER_RENAMES = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm"}
