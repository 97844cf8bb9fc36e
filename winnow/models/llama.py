"""Native Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

Tokens are flat ([T], sequence after sequence). Projections are fused: one QKV matmul and one
gate/up matmul per layer; `load_weights` maps HF checkpoint names onto that layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from winnow.models import cpu_kernels
from winnow.models.attention import AttentionBackend, TorchAttentionBackend
from winnow.models.attention_metadata import AttentionMetadata
from winnow.models.config import ModelConfig
from winnow.models.decode_stack import DecodeStack
from winnow.models.packed_linear import PackedLinear, lossless_weight_dtype, pack_linears
from winnow.models.rope import RotaryEmbedding, apply_rope

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    use_cpu_kernels = False  # set per instance by LlamaForCausalLM.pack_for_cpu

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_cpu_kernels:
            out = cpu_kernels.rms_norm(x, self.weight, self.eps)
            if out is not None:
                return out
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    use_cpu_kernels = False  # set per instance by LlamaForCausalLM.pack_for_cpu

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.sliding_window = config.sliding_window
        self.backend = backend
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

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
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = self.backend.forward(q, k, v, kv_cache, attn, self.sliding_window)
        return self.o_proj(out.reshape(tokens, self.q_size))

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.use_cpu_kernels:
            out = cpu_kernels.rope(x, cos, sin)
            if out is not None:
                return out
        return apply_rope(x, cos, sin)


class MLP(nn.Module):
    use_cpu_kernels = False  # set per instance by LlamaForCausalLM.pack_for_cpu

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        hidden = cpu_kernels.silu_mul(gate_up) if self.use_cpu_kernels else None
        if hidden is None:
            hidden = F.silu(gate_up[:, : self.intermediate_size])
            hidden.mul_(gate_up[:, self.intermediate_size :])
        return self.down_proj(hidden)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Updates the residual stream `hidden` in place and returns it."""
        hidden.add_(self.self_attn(self.input_norm(hidden), cos, sin, kv_cache, attn))
        hidden.add_(self.mlp(self.post_attn_norm(hidden)))
        return hidden


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        backend = backend or TorchAttentionBackend()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Module | None = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(config)
        self.decode_stack: DecodeStack | None = None  # set by pack_for_cpu

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
        if self.decode_stack is not None and attn.is_decode_only:
            self.decode_stack.run(hidden, cos, sin, kv_caches, attn)
            return self.norm(hidden)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos, sin, kv_cache, attn)
        return self.norm(hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden rows [N, hidden] -> float32 logits [N, vocab]."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def pack_for_cpu(self) -> None:
        """Move every projection and the output head onto the packed CPU kernel, and norms, RoPE
        and the MLP activation onto theirs (after loading), and decode-only steps onto the C
        decoder stack. The panels are 16-bit when every weight holds exactly in 16 bits (see
        `lossless_weight_dtype`). A tied head gets its own packed copy; embedding lookups keep
        the original."""
        linears = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        head = [self.embed_tokens.weight] if self.lm_head is None else []
        weight_dtype = lossless_weight_dtype(linears + head)
        dtype_name = str(weight_dtype).removeprefix("torch.")
        logger.info("CPU kernels: projection weights packed as %s", dtype_name)
        pack_linears(self, weight_dtype)
        if self.lm_head is None:
            self.lm_head = PackedLinear(self.embed_tokens.weight.to(weight_dtype), None)
        for module in self.modules():
            if isinstance(module, RMSNorm | Attention | MLP):
                module.use_cpu_kernels = True
        layers = [layer for layer in self.layers if isinstance(layer, DecoderLayer)]
        if DecodeStack.supports(layers):
            self.decode_stack = DecodeStack(layers)

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
