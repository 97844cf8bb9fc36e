"""The built-in demo models: deterministic random-weight Llama checkpoints built offline.

Each is a standard HF directory (config, generation config, `model.safetensors`, tokenizer, chat
template) under `$WINNOW_CACHE_DIR` (default `~/.cache/winnow`), so that transformers loads it too.
The tokenizer is the real Mistral v3 sentencepiece model shipped inside `mistral_common`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from winnow.models.demo_template import DEMO_CHAT_TEMPLATE
from winnow.models.model_cache import build_once, cache_root

# Bump when the recipe changes so that stale cached builds are rebuilt.
BUILD_VERSION = 2
_MARKER = ".winnow-demo-build"
_TOKENIZER_RESOURCE = "mistral_instruct_tokenizer_240323.model.v3"
CONTROL_TOKENS = (
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)


@dataclass(frozen=True)
class DemoSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    seed: int
    vocab_size: int = 32768
    dtype: str = "float32"  # of the saved weights (drawn in fp32, then rounded)

    @property
    def num_parameters(self) -> int:
        head_dim = self.hidden_size // self.num_heads
        attn = self.hidden_size * head_dim * 2 * (self.num_heads + self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        heads = 1 if self.tie_word_embeddings else 2
        return (
            heads * self.vocab_size * self.hidden_size
            + self.num_layers * per_layer
            + self.hidden_size
        )


_LARGE = DemoSpec(
    hidden_size=1024,
    num_layers=8,
    num_heads=16,
    num_kv_heads=8,
    intermediate_size=2816,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    seed=4321,
)

# All untied: with tied random embeddings the strongest logit is the input token itself, so
# greedy decoding would repeat it forever.
DEMO_SPECS: dict[str, DemoSpec] = {
    "demo": DemoSpec(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        seed=1234,
    ),
    "demo-large": _LARGE,
    # demo-large's weights rounded to bf16, as most published checkpoints are stored
    "demo-large-bf16": replace(_LARGE, dtype="bfloat16"),
}
DEMO_MODELS: tuple[str, ...] = tuple(DEMO_SPECS)


def build_demo_model(name: str = "demo", root: Path | None = None) -> Path:
    """Build (once) and return the directory of demo model `name` (under `cache_root()`)."""
    if name not in DEMO_SPECS:
        raise ValueError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_MODELS)}")
    target = (cache_root() if root is None else Path(root)) / name
    return build_once(
        target, _MARKER, BUILD_VERSION, lambda out: _write_model_dir(out, DEMO_SPECS[name])
    )


def _write_model_dir(out: Path, spec: DemoSpec) -> None:
    (out / "config.json").write_text(json.dumps(_hf_config(spec), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
    )
    dtype = getattr(torch, spec.dtype)
    weights = {name: tensor.to(dtype) for name, tensor in demo_weights(spec).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(out)


def _hf_config(spec: DemoSpec) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": spec.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": spec.dtype,
    }


def demo_weights(spec: DemoSpec) -> dict[str, torch.Tensor]:
    """HF-named float32 weights drawn from one seeded CPU generator in a fixed order.

    Scales: embeddings std 1 and projections std 1/sqrt(fan_in), so every layer writes to the
    residual stream about as strongly as the token embedding (q/k doubled for sharper,
    context-dependent attention). lm_head std 4/sqrt(hidden) gives logits of std ~4 after the
    final norm: next-token distributions look like a real model's (top-1 probability ~0.3,
    entropy ~4 nats) instead of near-uniform or one-hot, and greedy text does not loop.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    head_dim = spec.hidden_size // spec.num_heads
    q_size, kv_size = spec.num_heads * head_dim, spec.num_kv_heads * head_dim
    hidden, inter = spec.hidden_size, spec.intermediate_size

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    in_std = hidden**-0.5
    weights = {"model.embed_tokens.weight": normal(spec.vocab_size, hidden, std=1.0)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = torch.ones(hidden)
        weights[p + "self_attn.q_proj.weight"] = normal(q_size, hidden, std=2.0 * in_std)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_size, hidden, std=2.0 * in_std)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_size, hidden, std=in_std)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, q_size, std=q_size**-0.5)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, hidden, std=in_std)
        weights[p + "mlp.up_proj.weight"] = normal(inter, hidden, std=in_std)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, inter, std=inter**-0.5)
    weights["model.norm.weight"] = torch.ones(hidden)
    if not spec.tie_word_embeddings:
        weights["lm_head.weight"] = normal(spec.vocab_size, hidden, std=4.0 * in_std)
    return weights


def _write_tokenizer(out: Path) -> None:
    """Copy the v3 sentencepiece model, then save the HF tokenizer files with the chat template."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    source = resources.files("mistral_common") / "data" / _TOKENIZER_RESOURCE
    with resources.as_file(source) as sp_model:
        shutil.copyfile(sp_model, out / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True, add_eos_token=False)
    # The control pieces already have ids 3..9; registering them as special added tokens makes
    # the template's literal "[INST]" etc. encode to those single ids instead of being split.
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS],
        special_tokens=True,
    )
    tok.chat_template = DEMO_CHAT_TEMPLATE.strip()
    tok.save_pretrained(str(out))
