"""Native Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

Tokens are flat ([T], sequence after sequence). Projections are fused: one QKV matmul and one
gate/up matmul per layer; `load_weights` maps HF checkpoint names onto that layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from winnow.kernels import AttentionMetadata, Kernels, reference_kernels
from winnow.models.config import ModelConfig
from winnow.models.rope import RotaryEmbedding


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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.sliding_window = config.sliding_window
        self.kernels = kernels
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
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
    def __init__(self, config: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.kernels = kernels
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.pointwise.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.self_attn = Attention(config, kernels)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.mlp = MLP(config, kernels)

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
    def __init__(self, config: ModelConfig, kernels: Kernels | None = None) -> None:
        super().__init__()
        self.config = config
        self.kernels = kernels = kernels or reference_kernels()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, kernels) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.lm_head: nn.Module | None = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        """Hidden rows [N, hidden] -> float32 logits [N, vocab]."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def prepare_kernels(self) -> None:
        """Let the kernels adapt the loaded weights (e.g. pack projections); once, after loading."""
        self.kernels.prepare(self, list(self.layers))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into the fused layout; all params must be filled."""
        params = dict(self.named_parameters())
        filled: set[tuple[str, int]] = set()
        for hf_name, tensor in weights:
            target = self._native_target(hf_name)
            if target is None:
                continue
            name, shard, start = target
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} does not fit this model config")
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

    def _native_target(self, hf_name: str) -> tuple[str, int, int | None] | None:
        """(parameter name, shard index, row offset or None) for an HF name; None = ignore."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        if hf_name == "lm_head.weight":
            return None if self.lm_head is None else ("lm_head.weight", 0, None)
        name = hf_name.removeprefix("model.")
        match = _LAYER_PARAM.fullmatch(name)
        if match is None:
            return name, 0, None
        layer, module, kind = match.groups()
        if module in _QKV_SHARDS:
            shard = _QKV_SHARDS[module]
            q_size = self.config.num_heads * self.config.head_dim
            kv_size = self.config.num_kv_heads * self.config.head_dim
            start = (0, q_size, q_size + kv_size)[shard]
            return f"layers.{layer}.self_attn.qkv_proj.{kind}", shard, start
        if module in _GATE_UP_SHARDS:
            shard = _GATE_UP_SHARDS[module]
            start = shard * self.config.intermediate_size
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
